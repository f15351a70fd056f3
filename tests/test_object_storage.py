"""Object storage (issue 11): recipes that read and write ``s3://`` against a real S3
server (moto's standalone server on loopback, spoken to through s3fs), byte for byte
the same output as on local files; kill and resume on S3; the object-store lock;
and a Dask cluster of separate scheduler and worker processes that share no folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import make_text, write_jsonl, write_recipe

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("upath")

from gristmill.pipeline import storage  # noqa: E402
from gristmill.pipeline.runner import OutputLocked, output_lock, run_recipe  # noqa: E402

STAGES = [
    {"stage": "length_filter", "min_chars": 40},
    {"stage": "exact_dedup"},
    {"stage": "minhash_dedup", "threshold": 0.8},
    {"stage": "text_stats"},
    {"stage": "gopher", "min_words": 20},
    {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.7},
    {"stage": "sample", "fraction": 0.8},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port}")


@contextlib.contextmanager
def moto_s3_server():
    """moto's S3 server in its own process on 127.0.0.1; its address and dummy
    credentials go into the environment, where s3fs (and every subprocess) finds them.
    fsspec's cached s3 filesystems are dropped on the way in and out, so a cached one
    never talks to another module's server."""
    import s3fs

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc, "moto server")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    with moto_s3_server() as env:
        yield env


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """5 JSONL files and one Parquet file x 24 documents, exact and near duplicates
    across files."""
    rng = random.Random(11)
    pool = [make_text(rng, 120) for _ in range(4)]
    folder = tmp_path / "corpus"
    for f in range(5):
        recs = []
        for i in range(24):
            r = rng.random()
            if r < 0.1:
                text = rng.choice(pool)
            elif r < 0.2:
                text = rng.choice(pool) + " harvest"  # a near duplicate
            else:
                text = make_text(rng, rng.randint(10, 200))
            recs.append({"id": f"f{f}-{i}", "text": text})
        write_jsonl(folder / f"part-{f:02d}.jsonl", recs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [make_text(rng, rng.randint(10, 200)) for _ in range(22)] + pool[:2]
    pq.write_table(pa.table({"id": [f"p-{i}" for i in range(24)], "text": texts}),
                   folder / "part-05.parquet", row_group_size=8)
    return folder


@pytest.fixture
def bucket(s3_server) -> str:
    import fsspec

    name = f"gm-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


def _upload(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), url.removeprefix("s3://") + "/" + f.relative_to(local).as_posix())


def _recipe(tmp_path: Path, name: str, source: str, out: str, **extra) -> Path:
    body = {"name": "s3", "seed": 5,
            "sources": [{"path": source, "name": "web", "fields": {"id": "id"}}],
            "stages": STAGES,
            "output": {"path": out, "shard_size": "16KB", "write_dropped": True},
            "engine": {"kind": "local", "workers": 1, "batch_size": 16}}
    body.update(extra)
    return write_recipe(tmp_path / name, **body)


def _files(root: str) -> dict[str, bytes]:
    """Every file of an output folder (local or s3://), relative path -> bytes."""
    root_path = storage.as_path(root)
    out = {}
    for f in storage.find_files(root_path):
        rel = str(f)[len(str(root_path).rstrip("/")) + 1:]
        out[rel] = storage.read_bytes(f)
    return out


def _comparable(manifest: dict, inputs_moved: bool = False) -> dict:
    """A manifest without what legitimately differs between two locations (and where
    the inputs were moved, their paths and modification times)."""
    out = {k: v for k, v in manifest.items() if k not in ("timings", "recipe", "fingerprint")}
    if inputs_moved:
        out["files"] = [{k: v for k, v in f.items() if k not in ("path", "mtime_ns")}
                        for f in out["files"]]
    return out


def _same_output(local_out: Path, remote_out: str, local_m: dict, remote_m: dict,
                 inputs_moved: bool = False) -> None:
    assert _comparable(remote_m, inputs_moved) == _comparable(local_m, inputs_moved)
    a, b = _files(str(local_out)), _files(remote_out)
    data_files = [k for k in a if k.startswith(("shards/", "dropped/", "rejects/", "artifacts/"))]
    assert data_files and any(k.startswith("dropped/") for k in data_files)
    assert sorted(data_files) == sorted(k for k in b if k.startswith(
        ("shards/", "dropped/", "rejects/", "artifacts/")))
    for k in data_files:
        assert a[k] == b[k], k
    assert not any(k.startswith("_work/") for k in b)
    assert json.loads(b["manifest.json"]) == remote_m


def test_recipe_reading_and_writing_s3_writes_the_bytes_it_writes_locally(tmp_path, small_corpus,
                                                                          bucket):
    _upload(small_corpus, f"s3://{bucket}/in")
    local = run_recipe(_recipe(tmp_path, "local.yaml", str(small_corpus), str(tmp_path / "out")),
                       progress=False)
    remote_out = f"s3://{bucket}/out"
    rec = _recipe(tmp_path, "s3.yaml", f"s3://{bucket}/in", remote_out)  # a prefix
    remote = run_recipe(rec, progress=False)
    assert local["counts"]["reconciled"] and local["counts"]["dropped"] > 0
    # the inputs are listed by their URLs, with the objects' sizes and content hashes
    assert [f["path"] for f in remote["files"]] == [
        f"s3://{bucket}/in/part-{i:02d}.jsonl" for i in range(5)] + [
        f"s3://{bucket}/in/part-05.parquet"]
    for a, b in zip(local["files"], remote["files"], strict=True):
        assert (a["size"], a["xxh3_128"]) == (b["size"], b["xxh3_128"])
    _same_output(tmp_path / "out", remote_out, local, remote, inputs_moved=True)
    # a finished output is not run again: the same manifest comes back
    assert run_recipe(rec, progress=False) == remote


def _wait_for(cond, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_resume_after_kill_on_s3_gives_the_same_output(tmp_path, small_corpus, bucket, s3_server):
    import fsspec

    local = run_recipe(_recipe(tmp_path, "local.yaml", str(small_corpus), str(tmp_path / "out")),
                       progress=False)
    remote_out = f"s3://{bucket}/out"
    rec = _recipe(tmp_path, "s3.yaml", str(small_corpus), remote_out)
    code = ("import sys; from gristmill.pipeline.runner import run_recipe; "
            "run_recipe(sys.argv[1], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(rec)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **s3_server,
                                                         "GRISTMILL_LOCK_TTL": "2"})
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    markers = f"{bucket}/out/_work/seg01/task-*/done.json"
    assert _wait_for(lambda: len(fs.glob(markers)) >= 2 or proc.poll() is not None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not fs.exists(f"{bucket}/out/manifest.json")
    assert fs.exists(f"{bucket}/out/.gristmill.lock")  # the killed run's lock is left behind
    done_before = set(fs.glob(markers))
    # the dead run's lock is taken over once it is older than its time to live
    os.environ["GRISTMILL_LOCK_TTL"] = "2"
    try:
        time.sleep(2.5)
        resumed = run_recipe(rec, progress=False)
    finally:
        del os.environ["GRISTMILL_LOCK_TTL"]
    assert done_before  # the resumed run had finished tasks to skip
    _same_output(tmp_path / "out", remote_out, local, resumed)
    assert not fs.exists(f"{bucket}/out/.gristmill.lock")


def test_a_live_lock_on_s3_refuses_a_second_run(tmp_path, bucket):
    out = f"s3://{bucket}/locked"
    with output_lock(storage.as_path(out)) as lock:
        assert type(lock).__name__ == "ObjectLock"
        with pytest.raises(OutputLocked, match="in use by another gristmill run"):
            with output_lock(storage.as_path(out)):
                pass
    with output_lock(storage.as_path(out)):  # released: free again
        pass


def test_racing_runs_never_hold_the_s3_lock_at_once(tmp_path, bucket, s3_server):
    out = f"s3://{bucket}/race"
    code = ("import sys, time; from gristmill.pipeline import storage; "
            "from gristmill.pipeline.runner import OutputLocked, output_lock\n"
            "try:\n"
            "    with output_lock(storage.as_path(sys.argv[1])):\n"
            "        print('held', flush=True); time.sleep(8)\n"
            "except OutputLocked:\n"
            "    print('refused', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, **s3_server}) for _ in range(3)]
    said = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(said) == ["held", "refused", "refused"], said


@pytest.fixture
def dask_cluster(tmp_path, s3_server):
    """``dask scheduler`` and two ``dask worker`` processes on loopback, each worker in its
    own empty folder: they share nothing with the driver or each other but the S3 server."""
    pytest.importorskip("distributed")
    dask_cli = Path(sys.executable).with_name("dask")
    port = _free_port()
    env = {**os.environ, **s3_server}
    procs = [subprocess.Popen([str(dask_cli), "scheduler", "--host", "127.0.0.1", "--port",
                               str(port), "--no-dashboard"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_port(port, procs[0], "dask scheduler")
        for i in range(2):
            home = tmp_path / f"worker-{i}"
            home.mkdir()
            procs.append(subprocess.Popen(
                [str(dask_cli), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                 "--no-dashboard", "--host", "127.0.0.1", "--local-directory", str(home)],
                env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_dask_cluster_of_separate_processes_reads_and_writes_s3(tmp_path, small_corpus, bucket,
                                                                 dask_cluster):
    _upload(small_corpus, f"s3://{bucket}/in")
    source = f"s3://{bucket}/in/part-*"  # a glob
    local_out = f"s3://{bucket}/local-engine"
    local = run_recipe(_recipe(tmp_path, "local.yaml", source, local_out), progress=False)
    remote_out = f"s3://{bucket}/dask-engine"
    rec = _recipe(tmp_path, "dask.yaml", source, remote_out,
                  engine={"kind": "dask", "scheduler": dask_cluster, "batch_size": 16})
    remote = run_recipe(rec, progress=False)
    assert local["counts"]["dropped"] > 0
    a, b = _files(local_out), _files(remote_out)
    data = sorted(k for k in a if k.startswith(("shards/", "dropped/", "rejects/", "artifacts/")))
    assert data == sorted(k for k in b if k.startswith(
        ("shards/", "dropped/", "rejects/", "artifacts/")))
    for k in data:
        assert a[k] == b[k], k
    assert _comparable(local) == _comparable(remote)
    # the workers wrote nothing in their own folders but dask's scratch space
    for i in range(2):
        home = tmp_path / f"worker-{i}"
        assert not [p for p in home.rglob("*.parquet")] and not list(home.rglob("done.json"))


def test_beam_reads_and_writes_s3_like_the_local_engine(tmp_path, small_corpus, bucket):
    pytest.importorskip("apache_beam")
    _upload(small_corpus, f"s3://{bucket}/in")
    stages = [{"stage": "exact_dedup"}, {"stage": "text_stats"},
              {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.7}]
    local_out, beam_out = f"s3://{bucket}/local-engine", f"s3://{bucket}/beam-engine"
    local = run_recipe(_recipe(tmp_path, "local.yaml", f"s3://{bucket}/in", local_out,
                               stages=stages), progress=False)
    beam = run_recipe(_recipe(tmp_path, "beam.yaml", f"s3://{bucket}/in", beam_out,
                              stages=stages, engine={"kind": "beam", "batch_size": 16}),
                      progress=False)
    a, b = _files(local_out), _files(beam_out)
    data = sorted(k for k in a if k.startswith(("shards/", "artifacts/")))
    assert data and data == sorted(k for k in b if k.startswith(("shards/", "artifacts/")))
    for k in data:
        assert a[k] == b[k], k
    assert local["counts"] == beam["counts"] and local["counts"]["dropped"] > 0
    assert not any(k.startswith("_work/") for k in b)


@pytest.mark.parametrize("size", [1000, 12 << 20])  # one PUT; a multipart upload
def test_a_failed_write_on_s3_leaves_no_object(bucket, size):
    path = storage.as_path(f"s3://{bucket}/run/shards/part-00000.parquet")
    with pytest.raises(RuntimeError, match="disk of the writer failed"):
        with storage.AtomicFile(path) as f:
            f.file.write(b"x" * size)
            raise RuntimeError("disk of the writer failed")
    assert not storage.exists(path) and not storage.is_dir(path.parent)
    storage.write_bytes(path, b"complete")
    assert storage.read_bytes(path) == b"complete"
    assert storage.is_dir(storage.as_path(f"s3://{bucket}/run"))
    assert storage.glob_files(storage.as_path(f"s3://{bucket}/run/*/*.parquet")) == [path]
    storage.remove_tree(storage.as_path(f"s3://{bucket}/run"))
    assert not storage.exists(path)


def test_a_parquet_object_is_downloaded_once_and_split_ones_read_by_row_groups(
        tmp_path, small_corpus, bucket, monkeypatch):
    """An unsplit Parquet object is read from S3 once (downloaded while hashed, then
    read locally), not read by pyarrow and downloaded again to hash it; a split one
    gives the rows and keys of the unsplit read."""
    from gristmill.pipeline import inputs as inputs_module
    from gristmill.pipeline.inputs import InputReader
    from gristmill.pipeline.readers import FileReport, InputTask
    from gristmill.pipeline.recipe import SourceSpec
    from gristmill.pipeline.splits import plan_splits, split_tasks

    url = f"s3://{bucket}/in"
    _upload(small_corpus, url)
    obj = f"{url}/part-05.parquet"
    size = storage.size(obj)
    read_bytes: list[int] = []
    real_open = storage.open_read

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read_bytes.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(storage, "open_read", lambda p: Counting(real_open(p)))
    spec = SourceSpec(path=obj)
    task = InputTask(index=0, source_index=0, path=obj, format="parquet", label="p", size=size)
    reader = InputReader(task, spec, FileReport(path=obj), 5, None)
    whole = [t for batch in reader for t in batch.to_pylist()]
    assert len(whole) == 24 and sum(read_bytes) == size
    assert reader.fingerprint["xxh3_128"] == inputs_module.hash_file(obj)
    pieces = split_tasks([task], plan_splits([task], size // 3))
    assert len(pieces) == 3
    split = [t for p in pieces
             for batch in InputReader(p, spec, FileReport(path=obj), 5, None)
             for t in batch.to_pylist()]
    assert split == whole
