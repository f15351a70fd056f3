"""A killed Beam run resumes (issue 11, item 6): barrier states a killed run saved are
loaded instead of computed again, input files whose shards were written are not read
again, and the output is byte for byte the uninterrupted run's. The run says what it
reuses on stderr before the pipeline starts. The same holds with the output on S3
(moto's server on loopback, tests/object_store_cluster.py): every marker, state and
result of the killed run is an object there.

The uninterrupted reference (the local engine) is run once for the module.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_text, write_jsonl, write_recipe

pytest.importorskip("apache_beam")

from gristmill.pipeline.runner import run_recipe  # noqa: E402

N_FILES = 8
RUN = ("import sys; from gristmill.pipeline.runner import run_recipe; "
       "run_recipe(sys.argv[1], progress=False, report=False)")


def _corpus(folder: Path) -> None:
    rng = random.Random(5)
    pool = [make_text(rng, 60) for _ in range(6)]
    for f in range(N_FILES):
        recs = [{"id": f"{f}-{i}", "text": rng.choice(pool) if rng.random() < 0.15
                 else make_text(rng, rng.randint(20, 120))} for i in range(80)]
        write_jsonl(folder / f"part-{f:02d}.jsonl", recs)


def _recipe(tmp_path: Path, kind: str, corpus: Path, out: str) -> Path:
    # small batches and shards make each file's write step long enough to stop a run
    # between two files (batches of 8 rows, 10 per file; 2 KB shards, 37 in all)
    return write_recipe(
        tmp_path / f"{kind}.yaml", name="beam-resume", seed=9,
        # a named source: its records' ``source`` is the name, wherever the recipe is
        sources=[{"path": str(corpus), "name": "web"}],
        stages=[{"stage": "exact_dedup"}, {"stage": "text_stats"},
                {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.6},
                {"stage": "sample", "fraction": 0.9}],
        output={"path": out, "shard_size": "2KB", "write_dropped": True},
        engine={"kind": kind, "workers": 1, "batch_size": 8})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The corpus, and the uninterrupted run's output folder and manifest (the local
    engine; the engines write the same bytes)."""
    root = tmp_path_factory.mktemp("beam-resume")
    _corpus(root / "corpus")
    manifest = run_recipe(_recipe(root, "local", root / "corpus", str(root / "local")),
                          progress=False, report=False)
    assert manifest["counts"]["read"] == N_FILES * 80 and manifest["counts"]["dropped"] > 0
    return root / "corpus", root / "local", manifest


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0,
              poll: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _start(recipe: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for sub in ("shards", "dropped", "rejects", "artifacts") if (out / sub).is_dir()
            for p in sorted((out / sub).rglob("*")) if p.is_file()}


def test_beam_run_killed_twice_resumes_and_writes_the_uninterrupted_output(tmp_path, reference):
    corpus, ref_out, ref = reference
    recipe = _recipe(tmp_path, "beam", corpus, str(tmp_path / "beam"))
    work = tmp_path / "beam" / "_work"
    results = work / "beam"

    # 1. killed once the first barrier (exact_dedup) has saved its state
    proc = _start(recipe, tmp_path / "run1.log")
    assert _wait_for(lambda: (work / "seg00" / "state.pkl").exists(), proc), \
        (tmp_path / "run1.log").read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "beam" / "manifest.json").exists()

    # 2. resumed: says so, reuses the saved state; stopped after its first file is written
    proc = _start(recipe, tmp_path / "run2.log")
    assert _wait_for(lambda: any(results.glob("task-*.json")), proc), \
        (tmp_path / "run2.log").read_text()
    proc.send_signal(signal.SIGSTOP)
    written = sorted(results.glob("task-*.json"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log2 = (tmp_path / "run2.log").read_text()
    m = re.search(r"resuming a killed beam run .*: 0 of 8 files already written, ([12]) of 2 "
                  r"barrier state\(s\) reused; reading 8 file\(s\) again", log2)
    assert m, log2
    assert 0 < len(written) < N_FILES, "the run was not stopped between two files"
    shards_written = sum(len(json.loads(p.read_text())["shards"]) for p in written)
    started = time.time_ns()

    # 3. resumed again: only the files not written are read; the output is the same
    # as the uninterrupted (local engine) run's, byte for byte
    proc = _start(recipe, tmp_path / "run3.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()
    log3 = (tmp_path / "run3.log").read_text()
    assert (f"{len(written)} of 8 files already written, 2 of 2 barrier state(s) reused; "
            f"reading {N_FILES - len(written)} file(s) again") in log3, log3
    # the shards of the files written before are moved into place, not written again
    old = [p for p in (tmp_path / "beam" / "shards").iterdir() if p.stat().st_mtime_ns < started]
    assert shards_written and len(old) == shards_written
    manifest = json.loads((tmp_path / "beam" / "manifest.json").read_text())
    assert _shards(tmp_path / "beam") == _shards(ref_out)
    assert manifest["counts"] == ref["counts"]
    assert [(s["rows"], s["sha256"]) for s in manifest["shards"]] == \
        [(s["rows"], s["sha256"]) for s in ref["shards"]]
    assert not work.exists()


def test_beam_run_killed_before_its_first_barrier_says_it_starts_over(tmp_path, reference):
    corpus, ref_out, ref = reference
    recipe = _recipe(tmp_path, "beam", corpus, str(tmp_path / "beam"))
    work = tmp_path / "beam" / "_work"
    proc = _start(recipe, tmp_path / "run1.log")
    # files are being read (an id ledger is written per file), no barrier is done yet
    assert _wait_for(lambda: any((work / "ids").glob("task-*")), proc), \
        (tmp_path / "run1.log").read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "seg00" / "state.pkl").exists(), "stopped too late for this test"
    proc = _start(recipe, tmp_path / "run2.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run2.log").read_text()
    log = (tmp_path / "run2.log").read_text()
    assert "saved no barrier state and wrote no file; starting it over" in log, log
    assert _shards(tmp_path / "beam") == _shards(ref_out)
    manifest = json.loads((tmp_path / "beam" / "manifest.json").read_text())
    assert manifest["counts"] == ref["counts"]


def test_beam_run_killed_with_its_output_on_s3_resumes_file_by_file(tmp_path, reference, bucket,
                                                                     s3_server):
    """Output on S3: killed once a file's result is written, resumed with the killed
    run's states and written files, byte for byte the uninterrupted output."""
    import fsspec
    from object_store_cluster import files

    corpus, ref_out, ref = reference
    out = f"s3://{bucket}/beam"
    recipe = _recipe(tmp_path, "beam", corpus, out)
    # the killed run's lock on S3 goes stale after 2 s, not the default 120 s
    env = {**os.environ, **s3_server, "GRISTMILL_LOCK_TTL": "2"}
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    results = f"{bucket}/beam/_work/beam/task-*.json"
    proc = _start(recipe, tmp_path / "run1.log", env)
    assert _wait_for(lambda: bool(fs.glob(results)), proc, poll=0.05), \
        (tmp_path / "run1.log").read_text()
    proc.send_signal(signal.SIGSTOP)
    written = fs.glob(results)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(written) < N_FILES, "the run was not stopped between two files"
    assert not fs.exists(f"{bucket}/beam/manifest.json")
    assert fs.exists(f"{bucket}/beam/.gristmill.lock")  # left behind by the killed run

    time.sleep(2.5)
    proc = _start(recipe, tmp_path / "run2.log", env)
    assert proc.wait(timeout=300) == 0, (tmp_path / "run2.log").read_text()
    log = (tmp_path / "run2.log").read_text()
    assert (f"resuming a killed beam run in {out}/_work: {len(written)} of 8 files already "
            f"written, 2 of 2 barrier state(s) reused; reading {N_FILES - len(written)} "
            f"file(s) again") in log, log
    got = files(out)
    assert {k: v for k, v in got.items() if k.split("/")[0] in
            ("shards", "dropped", "rejects", "artifacts")} == _shards(ref_out)
    manifest = json.loads(got["manifest.json"])
    assert manifest["counts"] == ref["counts"]
    assert not [k for k in got if k.startswith("_work/")]
    assert not fs.exists(f"{bucket}/beam/.gristmill.lock")
