"""Object storage (issue 11): recipes that read and write ``s3://`` against a real S3
server (moto's standalone server on loopback, spoken to through s3fs), byte for byte
the same output as on local files; kill and resume on S3; the object-store lock;
and a Dask cluster of separate scheduler and worker processes that share no folder.

The server and the cluster are started once per session (tests/object_store_cluster.py);
the local reference run is made once for the module and every engine and storage
combination is compared with it, file by file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_text, write_jsonl, write_recipe
from object_store_cluster import files, new_bucket, upload

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
DATA = ("shards/", "dropped/", "rejects/", "artifacts/")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """5 JSONL files and one Parquet file x 24 documents, exact and near duplicates
    across files."""
    rng = random.Random(11)
    pool = [make_text(rng, 120) for _ in range(4)]
    folder = tmp_path_factory.mktemp("s3-corpus") / "corpus"
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


@pytest.fixture(scope="module")
def corpus_url(s3_server, small_corpus) -> str:
    """The same corpus on S3 (uploaded once for the module)."""
    url = f"s3://{new_bucket()}/in"
    upload(small_corpus, url)
    return url


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus) -> tuple[Path, dict]:
    """The recipe on local files with the local engine, run once: every engine and
    storage combination below must write these bytes."""
    root = tmp_path_factory.mktemp("s3-reference")
    manifest = run_recipe(_recipe(root, "local.yaml", str(small_corpus), str(root / "out")),
                          progress=False)
    assert manifest["counts"]["reconciled"] and manifest["counts"]["dropped"] > 0
    return root / "out", manifest


def _recipe(tmp_path: Path, name: str, source: str, out: str, **extra) -> Path:
    body = {"name": "s3", "seed": 5,
            "sources": [{"path": source, "name": "web", "fields": {"id": "id"}}],
            "stages": STAGES,
            "output": {"path": out, "shard_size": "16KB", "write_dropped": True},
            "engine": {"kind": "local", "workers": 1, "batch_size": 16}}
    body.update(extra)
    return write_recipe(tmp_path / name, **body)


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
    a, b = files(str(local_out)), files(remote_out)
    data_files = [k for k in a if k.startswith(DATA)]
    assert data_files and any(k.startswith("dropped/") for k in data_files)
    assert sorted(data_files) == sorted(k for k in b if k.startswith(DATA))
    for k in data_files:
        assert a[k] == b[k], k
    assert not any(k.startswith("_work/") for k in b)
    assert json.loads(b["manifest.json"]) == remote_m


def test_recipe_reading_and_writing_s3_writes_the_bytes_it_writes_locally(tmp_path, reference,
                                                                          corpus_url, bucket):
    ref_out, ref = reference
    remote_out = f"s3://{bucket}/out"
    rec = _recipe(tmp_path, "s3.yaml", corpus_url, remote_out)  # a prefix
    remote = run_recipe(rec, progress=False)
    # the inputs are listed by their URLs, with the objects' sizes and content hashes
    assert [f["path"] for f in remote["files"]] == [
        f"{corpus_url}/part-{i:02d}.jsonl" for i in range(5)] + [f"{corpus_url}/part-05.parquet"]
    for a, b in zip(ref["files"], remote["files"], strict=True):
        assert (a["size"], a["xxh3_128"]) == (b["size"], b["xxh3_128"])
    _same_output(ref_out, remote_out, ref, remote, inputs_moved=True)
    # a finished output is not run again: the same manifest comes back
    assert run_recipe(rec, progress=False) == remote


def _wait_for(cond, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_resume_after_kill_on_s3_gives_the_same_output(tmp_path, reference, small_corpus, bucket,
                                                       s3_server):
    import fsspec

    ref_out, ref = reference
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
    _same_output(ref_out, remote_out, ref, resumed)
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
    """Three processes race for one output's lock. The one that gets it holds it until
    every process has said what it got (its stdin is closed only then), so two holders
    at once would be seen."""
    out = f"s3://{bucket}/race"
    code = ("import sys; from gristmill.pipeline import storage; "
            "from gristmill.pipeline.runner import OutputLocked, output_lock\n"
            "try:\n"
            "    with output_lock(storage.as_path(sys.argv[1])):\n"
            "        print('held', flush=True); sys.stdin.read()\n"
            "except OutputLocked:\n"
            "    print('refused', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, out], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **s3_server}) for _ in range(3)]
    try:
        said = [p.stdout.readline().strip() for p in procs]  # each says one line, then
    finally:                                                  # a holder waits on stdin
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert sorted(said) == ["held", "refused", "refused"], said
    assert all(p.returncode == 0 for p in procs)


def test_dask_cluster_of_separate_processes_reads_and_writes_s3(tmp_path, reference, corpus_url,
                                                                 bucket, s3_dask_cluster):
    ref_out, ref = reference
    remote_out = f"s3://{bucket}/dask-engine"
    rec = _recipe(tmp_path, "dask.yaml", f"{corpus_url}/part-*", remote_out,  # a glob
                  engine={"kind": "dask", "scheduler": s3_dask_cluster.address,
                          "batch_size": 16})
    remote = run_recipe(rec, progress=False)
    _same_output(ref_out, remote_out, ref, remote, inputs_moved=True)
    # the workers wrote nothing in their own folders but dask's scratch space
    for home in s3_dask_cluster.homes:
        assert not list(home.rglob("*.parquet")) and not list(home.rglob("done.json"))


def test_beam_reads_and_writes_s3_like_the_local_engine(tmp_path, reference, corpus_url, bucket):
    pytest.importorskip("apache_beam")
    ref_out, ref = reference
    beam_out = f"s3://{bucket}/beam-engine"
    beam = run_recipe(_recipe(tmp_path, "beam.yaml", corpus_url, beam_out,
                              engine={"kind": "beam", "batch_size": 16}), progress=False)
    _same_output(ref_out, beam_out, ref, beam, inputs_moved=True)


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
        corpus_url, monkeypatch):
    """An unsplit Parquet object is read from S3 once (downloaded while hashed, then
    read locally), not read by pyarrow and downloaded again to hash it; a split one
    gives the rows and keys of the unsplit read."""
    from gristmill.pipeline import inputs as inputs_module
    from gristmill.pipeline.inputs import InputReader
    from gristmill.pipeline.readers import FileReport, InputTask
    from gristmill.pipeline.recipe import SourceSpec
    from gristmill.pipeline.splits import plan_splits, split_tasks

    obj = f"{corpus_url}/part-05.parquet"
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


def test_split_planning_runs_on_the_dask_workers_reading_s3(tmp_path, bucket, s3_dask_cluster):
    """One planning task per big object on the cluster of separate processes: the
    workers read the objects and record their plans under the output's ``_work`` on
    S3; the plan is the one the driver makes alone, byte for byte."""
    from test_split_planning import BIG, SPLIT, _spec, _write_corpus

    from gristmill.pipeline.recipe import parse_recipe
    from gristmill.pipeline.runner import list_tasks, make_engine
    from gristmill.pipeline.splits import plan_splits

    _write_corpus(tmp_path / "in")
    upload(tmp_path / "in", f"s3://{bucket}/in")
    recipe = parse_recipe(_spec(f"s3://{bucket}/in", f"s3://{bucket}/out", kind="dask",
                                scheduler=s3_dask_cluster.address))
    tasks = list_tasks(recipe)
    serial = plan_splits(tasks, SPLIT)
    assert len(serial) == 3  # JSONL, multi-frame zstd, Parquet
    records = storage.as_path(f"s3://{bucket}/out/_work/plans")
    plans = plan_splits(tasks, SPLIT, make_engine(recipe, False).map_files, records)
    assert json.dumps(plans, sort_keys=True) == json.dumps(serial, sort_keys=True)
    written = [json.loads(storage.read_bytes(p)) for p in storage.find_files(records)]
    assert sorted(r["path"] for r in written) == [f"s3://{bucket}/in/{n}" for n in BIG]
    assert os.getpid() not in {r["planned_by"]["pid"] for r in written}  # on the workers
