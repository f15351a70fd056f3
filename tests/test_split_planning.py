"""The split planning pass runs one task per big file on the engine's workers
(``splits.plan_splits`` with the engine's ``map_files``): the plan is the one the
driver makes alone, byte for byte, on any engine and worker count; a file that
cannot be read stops the run with the usual one-line error; a pass stopped half way
does not plan again the files it had planned (``_work/plans``)."""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import make_text
from test_split_inputs import _content, _messy_lines
from test_split_zstd import frames_at

from gristmill.pipeline.recipe import parse_recipe
from gristmill.pipeline.runner import list_tasks, make_engine, run_recipe
from gristmill.pipeline.splits import plan_splits
from gristmill.pipeline.writers import atomic_write_json

SPLIT = 2048


@pytest.fixture(autouse=True)
def _plan_in_the_pool_at_any_size(monkeypatch):
    """The local engine plans small local inputs in the driver (``POOL_PLAN_BYTES``);
    these tests are about the pool, so it is used at any size (subprocesses inherit it)."""
    monkeypatch.setenv("GRISTMILL_PLAN_POOL_BYTES", "0")

STAGES = [{"stage": "text_stats"}, {"stage": "sample", "fraction": 0.7}]
BIG = ["b-big.jsonl", "c-big.jsonl.zst", "d-big.parquet", "e-one-frame.jsonl.zst"]


def _write_corpus(folder: Path) -> None:
    """One small file and four files over ``SPLIT``: JSONL, multi-frame zstd, Parquet
    with 12 row groups (each split), and a single-frame zstd file (planned, one task)."""
    folder.mkdir(parents=True)
    rng = random.Random(11)
    (folder / "a-small.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "text": make_text(rng, 20)}) + "\n" for i in range(10)))
    (folder / "b-big.jsonl").write_bytes(_messy_lines(rng, 150))
    data = _messy_lines(rng, 150)
    (folder / "c-big.jsonl.zst").write_bytes(
        frames_at(data, sorted(rng.sample(range(1, len(data)), 20))))
    rows = [{"id": f"p{i}", "text": make_text(rng, rng.randint(5, 40))} for i in range(240)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "d-big.parquet", row_group_size=20)
    one = b"".join(json.dumps({"id": f"o{i}", "text": make_text(rng, 30)}).encode() + b"\n"
                   for i in range(60))
    (folder / "e-one-frame.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(one))
    for name in BIG:
        assert (folder / name).stat().st_size > SPLIT, name


def _spec(folder: Path, out: Path, **engine) -> dict:
    return {"name": "planning", "seed": 4, "sources": [{"path": str(folder)}], "stages": STAGES,
            "output": {"path": str(out), "shard_size": "8KB", "write_dropped": True},
            "engine": {"batch_size": 32, "split_size": SPLIT, **engine}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("planning") / "in"
    _write_corpus(folder)
    return folder


def _as_run_json(tmp: Path, plans: dict) -> bytes:
    """The bytes of ``plans`` as the runner writes them into ``_work/run.json``."""
    atomic_write_json(tmp / "splits.json", plans)
    return (tmp / "splits.json").read_bytes()


@pytest.fixture(scope="module")
def serial(corpus, tmp_path_factory) -> dict:
    """The plan the driver makes alone, and the run on ``workers: 1`` (planning here)."""
    root = tmp_path_factory.mktemp("serial")
    recipe = parse_recipe(_spec(corpus, root / "out", workers=1))
    plans = plan_splits(list_tasks(recipe), SPLIT)
    m = run_recipe(recipe, progress=False, report=False)
    return {"plans": plans, "bytes": _as_run_json(root, plans),
            "shards": [(s["rows"], s["sha256"]) for s in m["shards"]],
            "content": _content(root / "out", m)}


def test_the_serial_plan_splits_every_kind_of_file(corpus, serial):
    plans = serial["plans"]
    assert list(plans) == [str(corpus / n) for n in BIG[:3]]  # file order; one frame: no plan
    assert all(len(plans[str(corpus / n)]["ranges"]) > 2 for n in BIG[:2])
    assert len(plans[str(corpus / "d-big.parquet")]["pieces"]) > 2


@pytest.mark.parametrize("engine", [{"kind": "local", "workers": 1},
                                    {"kind": "local", "workers": 2},
                                    {"kind": "local", "workers": 3},
                                    {"kind": "dask", "workers": 2},
                                    {"kind": "beam", "workers": 2}],
                         ids=["local-1", "local-2", "local-3", "dask", "beam"])
def test_the_plan_is_the_serial_one_on_every_engine(corpus, serial, tmp_path, engine):
    recipe = parse_recipe(_spec(corpus, tmp_path / "out", **engine))
    files = list_tasks(recipe)
    plans = plan_splits(files, SPLIT, make_engine(recipe, False).map_files, tmp_path / "plans")
    assert _as_run_json(tmp_path, plans) == serial["bytes"]
    # each planning task wrote its record, the single-frame file's too (planned, one task)
    records = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("file-*.json")]
    assert {r["path"]: r["plan"] for r in records} == \
        {str(corpus / n): serial["plans"].get(str(corpus / n)) for n in BIG}
    # where the tasks ran: here on workers: 1, in other processes (pool, Dask workers) else
    pids = {r["planned_by"]["pid"] for r in records}
    assert (pids == {os.getpid()}) == (engine["workers"] == 1), pids


@pytest.mark.parametrize("engine", [{"kind": "local", "workers": 2},
                                    {"kind": "dask", "workers": 2}], ids=["local-2", "dask"])
def test_a_run_planned_on_the_workers_writes_the_serial_runs_bytes(corpus, serial, tmp_path,
                                                                  engine):
    m = run_recipe(parse_recipe(_spec(corpus, tmp_path / "out", **engine)), progress=False,
                   report=False)
    assert [(s["rows"], s["sha256"]) for s in m["shards"]] == serial["shards"]
    assert _content(tmp_path / "out", m) == serial["content"]


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Which record files exist, and which write made each (inode, mtime)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("file-*.json")}


def test_a_pass_stopped_half_way_plans_only_the_files_it_had_not_planned(corpus, serial,
                                                                        tmp_path):
    recipe = parse_recipe(_spec(corpus, tmp_path / "out", workers=2))
    files = list_tasks(recipe)
    records = tmp_path / "plans"
    pool = make_engine(recipe, False).map_files
    plan_splits(files, SPLIT, pool, records)
    first = _stamps(records)
    assert len(first) == len(BIG)
    (records / "file-00002.json").unlink()  # c-big.jsonl.zst was not planned yet
    again = plan_splits(files, SPLIT, pool, records)
    assert _as_run_json(tmp_path, again) == serial["bytes"]
    now = _stamps(records)
    assert set(now) == set(first)
    assert [n for n in first if now[n] != first[n]] == ["file-00002.json"]  # only it ran
    # a file changed since its record, or another split_size: planned again
    b = corpus / "b-big.jsonl"
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    try:
        assert plan_splits(files, SPLIT, pool, records) == serial["plans"] | {
            str(b): {**serial["plans"][str(b)], "mtime_ns": st.st_mtime_ns + 1000}}
        later = _stamps(records)
        assert [n for n in now if later[n] != now[n]] == ["file-00001.json"]
    finally:
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    plan_splits(files, SPLIT + 1, pool, records)
    assert all(_stamps(records)[n] != later[n] for n in later)


def _without_root_reads() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that a root process obeys a file's mode like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("engine", [{"kind": "local", "workers": 1},
                                    {"kind": "local", "workers": 2},
                                    {"kind": "dask", "workers": 2}],
                         ids=["local-1", "local-2", "dask"])
def test_a_file_that_cannot_be_read_stops_the_planning_with_one_line(corpus, tmp_path, engine):
    """Permission denied on one big file, whichever worker plans it: the CLI's one-line
    error naming the file, exit status 1; the files planned before it keep their records
    and a second attempt does not plan them again."""
    shutil.copytree(corpus, tmp_path / "in")
    locked = tmp_path / "in" / "z-locked.jsonl"  # the last file
    locked.write_bytes((corpus / "b-big.jsonl").read_bytes())
    locked.chmod(0)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_spec(tmp_path / "in", tmp_path / "out", **engine)))
    cmd = [sys.executable, "-m", "gristmill.cli", "run", str(recipe), "--quiet"]

    def attempt() -> tuple[str, int]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_without_root_reads if os.geteuid() == 0 else None)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        return err.strip().splitlines()[-1], proc.pid

    want = (f"gristmill: Permission denied: {locked}. What was completed is kept; fix the "
            f"cause and run the same command again to resume")
    line, pid = attempt()
    assert line == want
    records = tmp_path / "out" / "_work" / "plans"
    assert not (tmp_path / "out" / "_work" / "run.json").exists()
    # planned in the run's process on workers: 1, on its workers else
    planners = {json.loads(p.read_text())["planned_by"]["pid"] for p in records.glob("*.json")}
    assert planners and (planners == {pid}) == (engine["workers"] == 1), (planners, pid)
    if engine["kind"] == "local":  # a pool finishes what it started; Dask may cancel
        first = _stamps(records)
        assert len(first) == len(BIG)  # z-locked is the last file: the others were planned
        assert attempt()[0] == want
        assert _stamps(records) == first  # not planned again


def test_a_parquet_file_without_a_footer_is_one_task_its_reader_reports(tmp_path):
    """Not a traceback from the planning pass: the file is read as one task and the
    manifest says it is unreadable, as for an unsplit file."""
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "bad.parquet"
    bad.write_bytes(random.Random(3).randbytes(3 * SPLIT))
    recipe = parse_recipe(_spec(tmp_path / "in", tmp_path / "out", workers=1))
    assert plan_splits(list_tasks(recipe), SPLIT) == {}
    m = run_recipe(recipe, progress=False, report=False)
    assert [f["status"] for f in m["files"]] == ["unreadable"]
    assert "Parquet magic bytes not found" in m["files"][0]["error"]


def test_small_local_inputs_are_planned_in_the_driver_even_with_workers(corpus, serial,
                                                                         tmp_path, monkeypatch):
    """Below ``POOL_PLAN_BYTES`` of local files the pool's start costs more than the
    planning: the driver plans them itself on ``workers: 2``, to the same plan."""
    monkeypatch.delenv("GRISTMILL_PLAN_POOL_BYTES")
    recipe = parse_recipe(_spec(corpus, tmp_path / "out", workers=2))
    files = list_tasks(recipe)
    plans = plan_splits(files, SPLIT, make_engine(recipe, False).map_files, tmp_path / "plans")
    assert _as_run_json(tmp_path, plans) == serial["bytes"]
    records = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")]
    assert records and {r["planned_by"]["pid"] for r in records} == {os.getpid()}
