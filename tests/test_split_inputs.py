"""Big inputs split into several tasks give exactly the records, row keys, rejects
and counts of the unsplit run (gristmill.pipeline.splits)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gristmill.pipeline import runner as runner_module
from gristmill.pipeline.inputs import InputChangedDuringRun, InputReader
from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import RecipeError, SourceSpec, load_recipe, parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.splits import (
    empty_reject,
    merge_files,
    plan_jsonl,
    plan_splits,
    split_tasks,
)
from gristmill.pipeline.stage import KEY_POS_BITS, ROW_KEY

STAGES = [{"stage": "exact_dedup"}, {"stage": "text_stats"},
          {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.8},
          {"stage": "sample", "fraction": 0.7}]


def _messy_lines(rng: random.Random, n: int) -> bytes:
    """JSONL with every kind of line a reader meets, CRLF and LF, multi-byte text."""
    out = [b"\xef\xbb\xbf"]  # a byte order mark at the very start
    for i in range(n):
        u = rng.random()
        if u < 0.06:
            line = rng.choice([b"", b"  ", b"\r", b" \t "])
        elif u < 0.10:
            line = b'{"id": "x", "text": '  # malformed JSON
        elif u < 0.13:
            line = b'{"id": "u8", "text": "caf\xc3"}'  # invalid UTF-8
        elif u < 0.15:
            line = b'{"text": "\\ud800 lone"}'
        elif u < 0.18:
            line = b'{"id": "same", "text": "repeated id"}'
        elif u < 0.20:
            line = json.dumps({"id": f"d{i}", "text": 5}).encode()
        elif u < 0.22:
            line = json.dumps({"id": f"long{i}", "text": make_text(rng, 400)}).encode()
        else:
            text = make_text(rng, rng.randint(3, 60)) + rng.choice(["", " é", " 😀 ünï"])
            line = json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False).encode()
        out.append(line + rng.choice([b"\n", b"\r\n"]))
    out.append(b'{"id": "last", "text": "no newline at the end"}')
    return b"".join(out)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("split") / "in"
    folder.mkdir()
    rng = random.Random(5)
    (folder / "a-small.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "text": make_text(rng, 30)}) + "\n" for i in range(20)))
    (folder / "b-big.jsonl").write_bytes(_messy_lines(rng, 400))
    return folder


def _recipe(folder: Path, out: Path, split, **engine) -> dict:
    return {"name": "split", "seed": 3, "sources": [{"path": str(folder)}], "stages": STAGES,
            "output": {"path": str(out), "shard_size": "8KB", "write_dropped": True},
            "engine": {"batch_size": 32, "split_size": split, **engine}}


def _run(folder: Path, out: Path, split, **engine) -> dict:
    return run_recipe(parse_recipe(_recipe(folder, out, split, **engine)), progress=False,
                      report=False)


def _content(out: Path, m: dict) -> dict:
    """What a split must not change: every kept record with its key, the drops, the
    rejects, the per-file entries, the counts and the repeated ids."""
    kept = pa.concat_tables([pq.read_table(out / s["path"]) for s in m["shards"]])
    dropped = pa.concat_tables([pq.read_table(out / f) for f in m["dropped"]])
    return {
        "kept": kept.to_pylist(),  # in order: task order is the file's line order
        "dropped": sorted(dropped.to_pylist(), key=lambda r: r[ROW_KEY]),
        "rejects": [(f, (out / f).read_text()) for f in m["rejects"]],
        "files": m["files"],
        "counts": m["counts"],
        "ids": m["ids"],
    }


@pytest.fixture(scope="module")
def unsplit(messy, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("unsplit") / "out"
    m = _run(messy, out, None)
    return {"manifest": m, "content": _content(out, m)}


def test_unsplit_reference_has_what_the_split_must_keep(unsplit):
    c = unsplit["content"]
    assert c["counts"]["reconciled"] and c["counts"]["rejected"] > 20
    big = c["files"][1]
    assert big["path"].endswith("b-big.jsonl") and big["index"] == 1 and big["status"] == "ok"
    assert c["ids"]["repeated_ids"] >= 1
    reasons = {json.loads(line)["reason"].split(":")[0]
               for line in c["rejects"][0][1].splitlines()}
    assert {"invalid UTF-8", "malformed JSON"} <= reasons
    # the line after the 400 generated ones (the byte order mark is no line)
    keys = {r["id"]: r[ROW_KEY] for r in c["kept"] + c["dropped"]}
    assert keys["last"] == (1 << KEY_POS_BITS) | 401


SPLIT = 8192  # the 45 KB file in about 6 pieces


@pytest.fixture(scope="module")
def split_local(messy, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("split_local") / "out"
    m = _run(messy, out, SPLIT, workers=1)
    return {"manifest": m, "content": _content(out, m),
            "shards": [(s["rows"], s["sha256"]) for s in m["shards"]]}


def test_split_jsonl_gives_the_unsplit_records_keys_rejects_and_counts(messy, unsplit,
                                                                       split_local):
    assert split_local["content"] == unsplit["content"]
    # it was split: more shards than the unsplit run, from several tasks of one file
    assert len(split_local["shards"]) > len(unsplit["manifest"]["shards"])
    big = messy / "b-big.jsonl"
    plan = plan_splits([InputTask(0, 0, str(big), "jsonl", "x", size=big.stat().st_size)],
                       SPLIT)
    assert len(plan[str(big)]["ranges"]) >= 5


@pytest.mark.parametrize("engine", [{"kind": "local", "workers": 2},
                                    {"kind": "dask", "workers": 2},
                                    {"kind": "beam", "workers": 2}],
                         ids=["local-2", "dask", "beam"])
def test_every_engine_writes_the_local_bytes_when_split(messy, tmp_path, split_local, engine):
    out = tmp_path / "out"
    m = _run(messy, out, SPLIT, **engine)
    assert [(s["rows"], s["sha256"]) for s in m["shards"]] == split_local["shards"]
    assert _content(out, m) == split_local["content"]


def assert_a_killed_split_run_resumes(inputs: Path, big: str, tmp_path: Path,
                                      monkeypatch) -> None:
    """Kill -9 a split run of ``inputs`` after three tasks and resume it here: the
    resume splits by the plan saved in run.json (no second planning pass; ``big``
    was cut in more than 10 ranges) and writes the uninterrupted run's bytes."""
    recipe, ref = tmp_path / "r.yaml", tmp_path / "ref.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(inputs, tmp_path / "killed", 2048)))
    ref.write_text(yaml.safe_dump(_recipe(inputs, tmp_path / "ref", 2048)))
    reference = run_recipe(load_recipe(ref), progress=False, report=False)
    work = tmp_path / "killed" / "_work" / "seg00"
    proc = subprocess.Popen([sys.executable, "-m", "gristmill.cli", "run", str(recipe),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and \
            len(list(work.glob("task-*/done.json"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    planned = json.loads((tmp_path / "killed" / "_work" / "run.json").read_text())["splits"]
    assert len(planned[str(inputs / big)]["ranges"]) > 10
    # the resume uses the saved plan: no second planning pass
    passes = []
    real = runner_module.plan_splits
    monkeypatch.setattr(runner_module, "plan_splits", lambda *a: passes.append(a) or real(*a))
    resumed = run_recipe(load_recipe(recipe), progress=False, report=False)
    assert passes == []
    assert [(s["rows"], s["sha256"]) for s in resumed["shards"]] == \
        [(s["rows"], s["sha256"]) for s in reference["shards"]]
    assert _content(tmp_path / "killed", resumed) == _content(tmp_path / "ref", reference)


def test_resume_after_kill_of_a_split_run_gives_the_same_bytes(messy, tmp_path, monkeypatch):
    assert_a_killed_split_run_resumes(messy, "b-big.jsonl", tmp_path, monkeypatch)


# -- the reader, piece by piece -------------------------------------------------------------

def _read(task: InputTask, spec: SourceSpec) -> tuple[pa.Table | None, FileReport]:
    report = FileReport(path=task.path)
    tables = list(read_task(task, spec, report, 7))
    return (pa.concat_tables(tables) if tables else None), report


LINES = st.one_of(
    st.sampled_from([b"", b" ", b"\r", b"null", b"{", b"[1]", b'{"text": 5}',
                     b'{"text": "a\xe2\x82"}', b"\xe2\x82\xac", b'{"text": "\\udc00"}',
                     b'{"id": "r", "text": "same id"}', b'{"text": "x", "text": "y"}']),
    st.text(min_size=0, max_size=40).map(
        lambda t: json.dumps({"text": t}, ensure_ascii=False).encode()),
)


@settings(derandomize=True, database=None, deadline=None, max_examples=80,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(LINES, st.sampled_from([b"\n", b"\r\n"])), min_size=1,
                      max_size=30),
       trailing=st.booleans(), bom=st.booleans(), split=st.integers(1, 120))
def test_any_layout_and_split_size_reads_like_the_whole_file(tmp_path, lines, trailing, bom,
                                                             split):
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(a + b for a, b in lines)
    if not trailing:
        data = data.rstrip(b"\r\n")
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    spec = SourceSpec(path=str(path))
    whole = InputTask(index=4, source_index=0, path=str(path), format="jsonl", label="f",
                      size=len(data))
    want, want_report = _read(whole, spec)
    plan = plan_jsonl(str(path), split)
    assert [r[0] for r in plan["ranges"]][0] == 0 and plan["ranges"][-1][1] == len(data)
    for (_, end, _, _), (start, _, _, _) in zip(plan["ranges"], plan["ranges"][1:], strict=False):
        assert end == start and data[start - 1:start] == b"\n"  # cuts after a newline only
    pieces = split_tasks([whole], {str(path): plan} if len(plan["ranges"]) > 1 else {})
    assert all(p.file_index == 4 for p in pieces)
    got_tables, reports = [], []
    for p in pieces:
        table, report = _read(p, spec)
        got_tables += [table] if table is not None else []
        reports.append(report)
    got = pa.concat_tables(got_tables) if got_tables else None
    assert (got.to_pylist() if got else []) == (want.to_pylist() if want else [])
    assert_pieces_report_as_the_file(pieces, reports, want_report)


def assert_pieces_report_as_the_file(pieces: list[InputTask], reports: list[FileReport],
                                     want: FileReport) -> None:
    """The pieces' reports, merged as the runner merges them, say what the whole
    file's report says: the same rejects in order, records, bytes and status."""
    merged = merge_files(pieces, [r.summary() for r in reports])[0]
    rejects = [r for rep in reports for r in rep.rejects]
    if len(pieces) > 1 and merged["status"] == "empty":  # the runner adds it per file
        rejects.append(empty_reject(pieces[0]))
    assert rejects == want.rejects
    assert {k: merged[k] for k in ("records", "rejected", "bytes", "status")} == \
        {k: getattr(want, k) for k in ("records", "rejected", "bytes", "status")}


def test_a_file_changed_after_planning_is_refused(tmp_path):
    path = tmp_path / "f.jsonl"
    body = "".join(json.dumps({"id": f"{i}", "text": f"line {i:03d}"}) + "\n" for i in range(60))
    path.write_text(body)
    whole = InputTask(index=0, source_index=0, path=str(path), format="jsonl", label="f",
                      size=len(body))
    pieces = split_tasks([whole], plan_splits([whole], 300))
    assert len(pieces) > 3
    spec = SourceSpec(path=str(path))

    def read(piece: InputTask) -> None:
        list(InputReader(piece, spec, FileReport(path=str(path)), 16, None))

    read(pieces[2])  # unchanged: reads
    st0 = path.stat()
    # same size, same mtime, other bytes in the piece: its range hash tells
    path.write_text(body.replace("line 030", "line 999"))
    os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    hit = next(p for p in pieces if p.start <= body.index("line 030") < p.end)
    with pytest.raises(InputChangedDuringRun, match="differ from the planned ones"):
        read(hit)
    # a grown file: size and mtime differ from the plan before any byte is read
    path.write_text(body + body)
    with pytest.raises(InputChangedDuringRun, match="changed after the run split it"):
        read(pieces[0])


def test_parquet_splits_by_row_groups_with_the_unsplit_rows_and_keys(tmp_path):
    rng = random.Random(2)
    texts = [make_text(rng, rng.randint(5, 40)) for _ in range(250)]
    for i in (3, 77, 140, 249):
        texts[i] = None  # rejected rows: null text
    folder = tmp_path / "in"
    folder.mkdir()
    table = pa.table({"id": [f"p{i}" for i in range(250)], "text": texts})
    pq.write_table(table, folder / "p.parquet", row_group_size=40)  # 7 row groups
    size = (folder / "p.parquet").stat().st_size
    task = InputTask(0, 0, str(folder / "p.parquet"), "parquet", "p", size=size)
    plan = plan_splits([task], size // 4)[str(folder / "p.parquet")]
    assert len(plan["pieces"]) >= 3
    assert [g for groups, _ in plan["pieces"] for g in groups] == list(range(7))
    assert [first for _, first in plan["pieces"]] == \
        [40 * groups[0] for groups, _ in plan["pieces"]]
    ref = _run(folder, tmp_path / "ref", None)
    got = _run(folder, tmp_path / "got", size // 4)
    # the pieces wrote their own shards: another layout of the same rows
    assert [s["rows"] for s in got["shards"]] != [s["rows"] for s in ref["shards"]]
    a, b = _content(tmp_path / "ref", ref), _content(tmp_path / "got", got)
    assert a == b
    assert a["counts"]["rejected"] == 4 and a["files"][0]["xxh3_128"]
    rows = sorted(r[ROW_KEY] & ((1 << KEY_POS_BITS) - 1) for r in a["kept"] + a["dropped"])
    assert rows == [i for i in range(250) if i not in (3, 77, 140, 249)]


def test_split_size_is_checked_before_any_data_is_read(tmp_path):
    with pytest.raises(RecipeError, match=r"engine\.split_size"):
        parse_recipe(_recipe(tmp_path, tmp_path / "o", "lots"))
    assert parse_recipe(_recipe(tmp_path, tmp_path / "o", "1KB")).engine.split_size == 1024
    assert parse_recipe(_recipe(tmp_path, tmp_path / "o", 0)).engine.split_size is None


def test_compressed_files_stay_one_task(tmp_path):
    import gzip

    path = tmp_path / "z.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 2000))
    task = InputTask(0, 0, str(path), "jsonl", "z", size=path.stat().st_size)
    assert plan_splits([task], 16) == {}
    assert split_tasks([task], {}) == [replace(task)]
