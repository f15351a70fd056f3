"""A file of many bad lines streams its rejects in bounded batches, with the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gristmill.pipeline.engines.local import run_task, task_dir
from gristmill.pipeline.inputs import listing
from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import SourceSpec, parse_recipe
from gristmill.pipeline.rejects import RejectsWriter, encode_rejects
from gristmill.pipeline.runner import list_tasks, run_recipe

N_LINES = 6000


def _write_mostly_bad(path: Path) -> Path:
    """Every kind of reject the careful path makes, with one good line in ten."""
    kinds = [b'{"text": "good %d"}', b'{"text": 1%d}', b"not json %d", b'{"txt": "%d"}',
             b'{"text": "\xff\xfe %d"}', b'{"text": "\\ud800 %d"}', b"null",
             b'{"text": "a", "text": "b%d"}', b"[%d]", b'{"text": "x%d", "meta": NaN}']
    lines = [(kinds[i % len(kinds)] % i) if b"%d" in kinds[i % len(kinds)]
             else kinds[i % len(kinds)] for i in range(N_LINES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _read(path: Path, report: FileReport) -> int:
    task = InputTask(index=0, source_index=0, path=str(path), format="jsonl", label="s")
    spec = SourceSpec(path=str(path), columns=["meta"])
    return sum(t.num_rows for t in read_task(task, spec, report, batch_size=64))


def test_many_bad_lines_stream_rejects_in_bounded_batches_with_identical_bytes(tmp_path):
    src = _write_mostly_bad(tmp_path / "bad.jsonl")
    held = FileReport(path=str(src))  # no sink: every reject in memory, as before
    kept = _read(src, held)
    expected = encode_rejects(held.rejects)
    assert kept == N_LINES // 10 and len(held.rejects) == N_LINES - kept
    assert held.held_peak == len(held.rejects)

    sink = RejectsWriter(tmp_path / "rejects.jsonl")
    streamed = FileReport(path=str(src), sink=sink, batch_rows=100)
    assert _read(src, streamed) == kept
    streamed.flush_rejects()
    assert sink.close()
    assert (tmp_path / "rejects.jsonl").read_bytes() == expected
    assert streamed.held_peak <= 100 and streamed.rejects == []
    assert sink.rows == held.rejected
    assert (streamed.records, streamed.rejected) == (held.records, held.rejected)


def test_rejects_are_flushed_by_raw_size_too(tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text("".join("{" + "x" * 5000 + "\n" for _ in range(50)))
    sink = RejectsWriter(tmp_path / "rejects.jsonl")
    report = FileReport(path=str(src), sink=sink, batch_chars=20_000)
    _read(src, report)
    report.flush_rejects()
    sink.close()
    assert report.held_peak <= 5  # 5,000+ raw characters each: flushed every 4 or 5
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 50


def test_a_file_without_rejects_writes_no_rejects_file(tmp_path):
    src = tmp_path / "ok.jsonl"
    src.write_text('{"text": "a"}\n')
    sink = RejectsWriter(tmp_path / "rejects.jsonl")
    _read(src, FileReport(path=str(src), sink=sink, batch_rows=1))
    assert not sink.close() and not (tmp_path / "rejects.jsonl").exists()


def _run(src: Path, out: Path, **engine) -> dict:
    body = {"name": "rejects", "sources": [{"path": str(src), "columns": ["meta"]}],
            "stages": [{"stage": "text_stats"}], "output": {"path": str(out)},
            "engine": {"batch_size": 256, **engine}}
    return run_recipe(parse_recipe(body), progress=False, report=False)


@pytest.mark.parametrize("engine", ["local", "dask", "beam"])
def test_every_engine_writes_the_rejects_file_a_reader_holding_them_all_would(tmp_path, engine):
    if engine == "beam":
        pytest.importorskip("apache_beam")
    if engine == "dask":
        pytest.importorskip("dask.distributed")
    src = _write_mostly_bad(tmp_path / "bad.jsonl")
    held = FileReport(path=str(src))
    _read(src, held)
    extra = {"dask": {"workers": 1}, "beam": {"workers": 1}}.get(engine, {})
    m = _run(src, tmp_path / "out", kind=engine, **extra)
    assert m["rejects"] == ["rejects/part-00000.jsonl"]
    assert (tmp_path / "out" / m["rejects"][0]).read_bytes() == encode_rejects(held.rejects)
    assert m["files"][0]["rejected"] == held.rejected and m["counts"]["reconciled"]


def test_a_resumed_run_writes_the_same_rejects(tmp_path):
    src = _write_mostly_bad(tmp_path / "in" / "bad.jsonl")
    shutil.copy(src, tmp_path / "in" / "bad2.jsonl")
    folder = tmp_path / "in"
    ref = _run(folder, tmp_path / "ref")
    # a run killed after its first task: the second task's folder holds a partial
    # rejects file under its temporary name and no done marker
    body = {"name": "rejects", "sources": [{"path": str(folder), "columns": ["meta"]}],
            "stages": [{"stage": "text_stats"}], "output": {"path": str(tmp_path / "res")},
            "engine": {"batch_size": 256}}
    recipe = parse_recipe(body)
    tasks = list_tasks(recipe)
    work = tmp_path / "res" / "_work"
    work.mkdir(parents=True)
    (work / "run.json").write_text(json.dumps({"fingerprint": recipe.fingerprint(),
                                               "inputs": listing(tasks)}))
    run_task(recipe, work, 0, tasks[0])
    partial = task_dir(work, 0, 1)
    partial.mkdir(parents=True)
    (partial / ".rejects.jsonl.tmp-1").write_bytes(b'{"half": ')
    resumed = run_recipe(recipe, progress=False, report=False)
    for name in ref["rejects"]:
        assert (tmp_path / "res" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert resumed["rejects"] == ref["rejects"] and len(ref["rejects"]) == 2
