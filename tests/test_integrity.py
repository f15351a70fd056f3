"""Record identity, input fingerprints, guards and faults (issue 10).

Each test names a defect found on real-world-shaped input; each failed before
the pipeline owned row identity, fingerprinted its inputs and guarded its
output folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl, write_recipe

from gristmill.pipeline.engines import local
from gristmill.pipeline.inputs import InputsChanged
from gristmill.pipeline.recipe import RecipeError, load_recipe
from gristmill.pipeline.runner import OutputLock, OutputLocked, run_recipe
from gristmill.pipeline.stage import ROW_KEY

CLI = [sys.executable, "-m", "gristmill.cli"]


def _kept(manifest: dict, out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])


def _recipe(tmp_path: Path, sources, stages, out="out", name="r.yaml", **extra) -> Path:
    body = {"sources": sources, "stages": stages,
            "output": {"path": str(tmp_path / out), "write_dropped": True},
            "engine": {"kind": "local", "workers": 1, "batch_size": 4}}
    body.update(extra)
    return write_recipe(tmp_path / name, **body)


# --- row identity -------------------------------------------------------------

def test_per_file_ids_neither_drop_unique_documents_nor_keep_true_copies(tmp_path):
    # ids restart at 0 in every file, as many Hugging Face exports do
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": i, "text": t} for i, t in
                                              enumerate(["alpha one", "beta two", "same copy"])])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": i, "text": t} for i, t in
                                              enumerate(["gamma three", "delta four",
                                                         "same copy"])])
    rec = _recipe(tmp_path, [{"path": str(tmp_path / "in")}], [{"stage": "exact_dedup"}])
    m = run_recipe(rec, progress=False)
    kept = _kept(m, tmp_path / "out")
    assert sorted(kept.column("text").to_pylist()) == sorted(
        ["alpha one", "beta two", "same copy", "gamma three", "delta four"])
    assert m["counts"]["dropped"] == 1 and m["counts"]["reconciled"]
    # the user's ids are carried unchanged; the pipeline's keys are unique
    assert sorted(kept.column("id").to_pylist()) == ["0", "0", "1", "1", "2"]
    assert len(set(kept.column(ROW_KEY).to_pylist())) == 5
    ids = m["ids"]
    assert ids["repeated_ids"] == 3 and ids["records_with_repeated_id"] == 6
    assert ids["distinct_ids"] == 3
    assert ids["examples"][0]["id"] == "0" and ids["examples"][0]["count"] == 2
    assert ids["examples"][0]["at"] == ["in/a.jsonl:1", "in/b.jsonl:1"]
    # the report says so too: the ids section (parsed) and the input fingerprints
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.section, self.cells = None, {}

        def handle_starttag(self, tag, attrs):
            if tag == "section":
                self.section = dict(attrs).get("id")

        def handle_data(self, data):
            if self.section and data.strip():
                self.cells.setdefault(self.section, []).append(data.strip())

    page = Cells()
    page.feed((tmp_path / "out" / "report.html").read_text())
    assert "in/a.jsonl:1, in/b.jsonl:1" in page.cells["ids"]
    assert m["files"][0]["xxh3_128"] in page.cells["files"]
    shown = subprocess.run(CLI + ["inspect", str(tmp_path / "out")], capture_output=True,
                           text=True)
    assert "ids: 3 ids repeat over 6 records" in shown.stdout, shown.stdout + shown.stderr


def test_a_named_source_over_several_files_derives_distinct_ids(tmp_path):
    for name in ("x", "y"):
        write_jsonl(tmp_path / "in" / f"{name}.jsonl",
                    [{"text": f"{name} document {i}"} for i in range(3)])
    rec = _recipe(tmp_path, [{"path": str(tmp_path / "in"), "name": "web"}],
                  [{"stage": "sample", "fraction": 1.0}])
    m = run_recipe(rec, progress=False)
    kept = _kept(m, tmp_path / "out")
    assert set(kept.column("source").to_pylist()) == {"web"}
    assert len(set(kept.column("id").to_pylist())) == 6
    assert m["ids"]["repeated_ids"] == 0
    assert [f["path"] for f in m["files"]] == ["in/x.jsonl", "in/y.jsonl"]


# --- guards -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["equal", "output_inside_input", "input_inside_output"])
def test_output_overlapping_an_input_is_refused_before_anything_is_deleted(tmp_path, layout):
    prev = tmp_path / "prev"
    shard = write_jsonl(prev / "shards" / "part-00000.jsonl", [{"text": "keep me"}])
    source, output = {"equal": (prev / "shards", prev / "shards"),
                      "output_inside_input": (prev, prev / "new"),
                      "input_inside_output": (prev / "shards", prev)}[layout]
    rec = write_recipe(tmp_path / "r.yaml", sources=[{"path": str(source)}], stages=[],
                       output={"path": str(output)})
    before = shard.read_bytes()
    for argv in (["run", str(rec), "--fresh", "--quiet"], ["run", str(rec), "--quiet"]):
        proc = subprocess.run(CLI + argv, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "output.path" in proc.stderr and "overlaps the input" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert shard.read_bytes() == before


def test_an_input_glob_under_the_output_folder_is_refused(tmp_path):
    write_jsonl(tmp_path / "o" / "in" / "a.jsonl", [{"text": "t"}])
    rec = write_recipe(tmp_path / "r.yaml", sources=[{"path": str(tmp_path / "o/in/*.jsonl")}],
                       stages=[], output={"path": str(tmp_path / "o")})
    with pytest.raises(RecipeError, match="overlaps the input"):
        run_recipe(rec, progress=False, fresh=True)
    assert (tmp_path / "o" / "in" / "a.jsonl").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "has space", ""])
def test_stage_names_that_are_not_plain_names_are_refused(tmp_path, name):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}])
    rec = _recipe(tmp_path, [{"path": str(tmp_path / "a.jsonl")}],
                  [{"stage": "text_stats", "name": name}])
    with pytest.raises(RecipeError, match=r"stages\[0\]\.name"):
        load_recipe(rec)
    assert not (tmp_path / "out").exists()


def test_stage_cache_tells_identical_recipes_in_different_folders_apart(tmp_path):
    recipes = []
    for folder in ("one", "two"):
        write_jsonl(tmp_path / folder / "a.jsonl", [{"text": "t"}])
        recipes.append(load_recipe(write_recipe(
            tmp_path / folder / "r.yaml", sources=[{"path": "a.jsonl"}],
            stages=[{"stage": "text_stats"}], output={"path": "out"})))
    a, b = recipes
    # the same recipe text: one fingerprint (the output is the same function of the input),
    # but relative paths in stages resolve against different folders
    assert a.fingerprint() == b.fingerprint()
    _, stages_a = local._stages_for(a, 0)
    _, stages_b = local._stages_for(b, 0)
    assert stages_a[0].base_dir == str(tmp_path / "one")
    assert stages_b[0].base_dir == str(tmp_path / "two")
    assert stages_b[0].resolve_path("m.bin") == str(tmp_path / "two" / "m.bin")


# --- changed inputs -------------------------------------------------------------

def test_rerun_after_an_input_grew_refuses_and_names_the_file(recipe_factory, corpus):
    rec = recipe_factory()
    first = run_recipe(rec, progress=False)
    assert all(len(f["xxh3_128"]) == 32 and f["size"] > 0 for f in first["files"])
    target = corpus / "part-03.jsonl"
    with open(target, "a") as f:
        f.write(json.dumps({"id": "late", "text": "appended after the run"}) + "\n")
    proc = subprocess.run(CLI + ["run", str(rec), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert f"changed: {target}" in proc.stderr and "--fresh" in proc.stderr
    again = run_recipe(rec, progress=False, fresh=True)
    assert again["counts"]["read"] == first["counts"]["read"] + 1


def test_touching_an_input_without_changing_it_is_not_a_change(recipe_factory, corpus):
    rec = recipe_factory()
    first = run_recipe(rec, progress=False)
    target = corpus / "part-05.jsonl"
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert run_recipe(rec, progress=False) == first
    target.write_text(target.read_text().replace("river", "rivet", 1))  # same size
    with pytest.raises(InputsChanged, match="same size, different content"):
        run_recipe(rec, progress=False)


def test_resume_refuses_when_a_finished_file_grew(recipe_factory, corpus, tmp_path):
    rec = recipe_factory(out="k")
    work = tmp_path / "k" / "_work" / "seg00"
    proc = subprocess.Popen(CLI + ["run", str(rec), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(work.glob("task-*/done.json"))) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(work.glob("task-*/done.json"))
    assert done and not (tmp_path / "k" / "manifest.json").exists()
    finished = json.loads(done[0].read_text())["file"]["path"]
    with open(finished, "a") as f:
        f.write(json.dumps({"id": "late", "text": "appended during the pause"}) + "\n")
    with pytest.raises(InputsChanged, match=f"changed: {finished}"):
        run_recipe(rec, progress=False)
    assert run_recipe(rec, progress=False, fresh=True)["counts"]["reconciled"]


# --- the lock ---------------------------------------------------------------------

def test_a_lock_whose_holder_was_killed_is_free(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; "
            "from gristmill.pipeline.runner import OutputLock; "
            f"l = OutputLock(Path({str(out)!r})); l.acquire(); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
        OutputLock(out).acquire()
    holder.kill()
    holder.wait()
    with OutputLock(out):  # the kernel released the dead holder's lock
        assert (out / ".gristmill.lock").exists()
    assert not (out / ".gristmill.lock").exists()


def test_racing_runs_never_hold_the_lock_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".gristmill.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))
    log = tmp_path / "log"
    code = ("import sys, time, os; from pathlib import Path; "
            "from gristmill.pipeline.runner import OutputLock, OutputLocked\n"
            f"l = OutputLock(Path({str(out)!r}))\n"
            "t = time.time() + 1.0\n"
            "while time.time() < t: pass\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        l.acquire()\n"
            "    except OutputLocked:\n"
            "        time.sleep(0.001); continue\n"
            f"    open({str(log)!r}, 'a').write(f'in {{time.monotonic_ns()}}\\n')\n"
            "    time.sleep(0.02)\n"
            f"    open({str(log)!r}, 'a').write(f'out {{time.monotonic_ns()}}\\n')\n"
            "    l.release(); break\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(6)]
    assert all(p.wait() == 0 for p in procs)
    events = sorted((int(t), kind) for kind, t in
                    (line.split() for line in log.read_text().splitlines()))
    depth = 0
    for _, kind in events:
        depth += 1 if kind == "in" else -1
        assert depth <= 1
    assert sum(kind == "in" for _, kind in events) >= 2


# --- faults -------------------------------------------------------------------

def _limit_file_size(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_write_ends_in_one_line_and_the_run_resumes(recipe_factory, tmp_path, workers):
    reference = run_recipe(recipe_factory(out="ref", name="ref.yaml"), progress=False)
    rec = recipe_factory(out="full", engine={"kind": "local", "workers": workers,
                                             "batch_size": 16})
    # a file size limit makes writes fail with EFBIG, as a full disk fails them with ENOSPC
    proc = subprocess.run(CLI + ["run", str(rec), "--quiet"], capture_output=True, text=True,
                          preexec_fn=_limit_file_size(6_000))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gristmill: File too large"), proc.stderr
    assert "resume" in lines[0]
    resumed = run_recipe(rec, progress=False)
    digests = [s["sha256"] for s in resumed["shards"]]
    assert digests == [s["sha256"] for s in reference["shards"]]
    assert resumed["counts"] == reference["counts"]


def test_a_vanished_input_is_a_fault_named_in_one_line(tmp_path):
    from gristmill.cli.pipeline import fault_line
    from gristmill.pipeline.inputs import InputReader
    from gristmill.pipeline.readers import FileReport, InputTask
    from gristmill.pipeline.recipe import SourceSpec

    gone = write_jsonl(tmp_path / "b.jsonl", [{"text": "two"}])
    task = InputTask(index=0, source_index=0, path=str(gone), format="jsonl", label="b")
    gone.unlink()  # listed, then gone before its task reads it
    reader = InputReader(task, SourceSpec(path=str(gone)), FileReport(path=str(gone)), 8, None)
    with pytest.raises(FileNotFoundError) as info:
        list(reader)
    line = fault_line(info.value)
    assert line.startswith("No such file or directory:") and str(gone) in line
    assert "\n" not in line


def test_killing_the_engine_process_takes_its_workers_with_it(tmp_path):
    rows = [{"text": f"document {i} " + "word " * 200} for i in range(3000)]
    for f in range(4):
        write_jsonl(tmp_path / "in" / f"p{f}.jsonl", rows)
    rec = _recipe(tmp_path, [{"path": str(tmp_path / "in")}],
                  [{"stage": "minhash_dedup", "num_perm": 512}],
                  engine={"kind": "local", "workers": 2, "batch_size": 64})
    proc = subprocess.Popen(CLI + ["run", str(rec), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:
        children = [c for c in parent.children(recursive=True) if c.is_running()]
        if len(children) >= 2:
            break
        time.sleep(0.05)
    assert len(children) >= 2, "the pool never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.pid for c in alive]


def test_id_ledger_buckets_are_a_pure_function_of_the_id_bytes():
    from gristmill.pipeline.inputs import ID_BUCKETS, _id_bucket

    ids = pa.array(["a", "b", "a", None, "", "héllo", "x" * 50])
    buckets = _id_bucket(ids).to_pylist()
    # pinned (mod 16: the partitions of the ledgers before buckets); a change here
    # changes how resumed runs route ids written before it
    assert [b % 16 for b in buckets] == [9, 13, 9, 3, 3, 14, 9]
    assert buckets[0] == buckets[2] and buckets[3] == buckets[4]
    assert _id_bucket(ids.slice(2)).to_pylist() == buckets[2:]
    assert _id_bucket(pa.chunked_array([ids.slice(0, 3), ids.slice(3)])).to_pylist() == buckets
    spread = _id_bucket(pa.array([f"{i}-{i * 7}" for i in range(409_600)])).to_numpy()
    counts = np.bincount(spread, minlength=ID_BUCKETS)
    assert counts.size == ID_BUCKETS and counts.min() > 50 and counts.max() < 160


def test_repeated_ids_do_not_depend_on_the_partition_count(tmp_path, monkeypatch):
    """The count at commit reads as many partitions as the ledgers' rows need; the
    figures and examples are the same with 1 partition or hundreds, and equal a
    direct count."""
    from collections import Counter

    from gristmill.pipeline import inputs
    from gristmill.pipeline.inputs import repeated_ids, write_id_ledger

    rng = np.random.default_rng(5)
    ledgers, every = [], []
    for f in range(4):
        ids = [f"doc-{int(v)}" for v in rng.integers(0, 6_000, 5_000)]
        keys = pa.array([(f << 40) | (i + 1) for i in range(len(ids))], pa.uint64())
        every += ids
        t = pa.table({"id": ids, ROW_KEY: keys})
        write_id_ledger(tmp_path / f"task-{f:05d}.parquet", [t.slice(0, 1_234), t.slice(1_234)])
        ledgers.append(tmp_path / f"task-{f:05d}.parquet")
    labels = {f: f"part-{f}.jsonl" for f in range(4)}
    monkeypatch.setattr(inputs, "LEDGER_ROWS_PER_PARTITION", 10**9)
    one = repeated_ids(ledgers, labels)
    monkeypatch.setattr(inputs, "LEDGER_ROWS_PER_PARTITION", 64)  # 313 partitions
    many = repeated_ids(ledgers, labels)
    assert one == many
    c = Counter(every)
    assert one["distinct_ids"] == len(c)
    assert one["repeated_ids"] == sum(1 for n in c.values() if n > 1)
    assert one["records_with_repeated_id"] == sum(n for n in c.values() if n > 1)
    first_seen = list(dict.fromkeys(i for i in every[:5_000] if c[i] > 1))
    assert [e["id"] for e in one["examples"]] == first_seen[:10]


class _FailingDisk(io.RawIOBase):
    """A stream whose device fails with EIO after ``good`` bytes, as a dying disk or a
    dropped connection does."""

    def __init__(self, data: bytes, good: int) -> None:
        self.data, self.good, self.pos = data, good, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.good:
            raise OSError(errno.EIO, "Input/output error")
        n = len(self.data) if n < 0 else n
        out = self.data[self.pos:min(self.pos + n, self.good)]
        self.pos += len(out)
        return out


def test_an_io_error_in_the_middle_of_an_input_is_a_fault_not_a_short_file(tmp_path):
    from gristmill.cli.pipeline import fault_line
    from gristmill.pipeline.readers import FileReport, _read_blocks

    data = b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(20_000))
    report = FileReport(path=str(tmp_path / "big.jsonl"))
    blocks = _read_blocks(_FailingDisk(data, good=len(data) // 2), report)
    with pytest.raises(OSError) as info:
        list(blocks)
    # before: the file was "unreadable" with half its lines kept, and the run went on
    assert report.status == "ok"
    assert info.value.errno == errno.EIO and info.value.filename == report.path
    line = fault_line(info.value)
    assert line.startswith("Input/output error: ") and report.path in line
