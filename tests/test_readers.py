"""Readers: formats, stable ids, rejects with reasons, truncated and empty files."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import SourceSpec


def _read(path, fmt="jsonl", spec=None, batch_size=1000, label="src"):
    spec = spec or SourceSpec(path=str(path))
    report = FileReport(path=str(path))
    task = InputTask(index=0, source_index=0, path=str(path), format=fmt, label=label)
    tables = list(read_task(task, spec, report, batch_size))
    table = pa.concat_tables(tables) if tables else None
    return table, report


LINES = [json.dumps({"text": f"doc {i}", "domain": "d"}) for i in range(50)]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_compressed_and_plain_jsonl_read_the_same(tmp_path, suffix):
    body = ("\n".join(LINES) + "\n").encode()
    path = tmp_path / f"in.{suffix}"
    if suffix.endswith("gz"):
        body = gzip.compress(body)
    elif suffix.endswith("zst"):
        body = zstandard.ZstdCompressor().compress(body)
    path.write_bytes(body)
    table, report = _read(path, label="in")
    assert table.column("text").to_pylist() == [f"doc {i}" for i in range(50)]
    assert table.column("id").to_pylist()[:2] == ["in:1", "in:2"]  # derived: source:line
    assert report.status == "ok" and report.records == 50 and report.rejected == 0


def test_batches_are_bounded_by_batch_size(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    spec = SourceSpec(path=str(path))
    report = FileReport(path=str(path))
    task = InputTask(index=0, source_index=0, path=str(path), format="jsonl", label="x")
    sizes = [t.num_rows for t in read_task(task, spec, report, 7)]
    assert max(sizes) <= 7 and sum(sizes) == 50


def test_bad_lines_are_rejected_with_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "good one"}',
        b'{"text": "unterminated',
        b'{"text": 42}',
        b'{"other": "no text"}',
        b'{"text": "bad \xff utf8"}',
        b'',
        b'[1, 2]',
        b'{"id": 7, "text": "int id is kept as string"}',
    ]) + b"\n")
    table, report = _read(path, label="bad")
    assert table.column("text").to_pylist() == ["good one", "int id is kept as string"]
    assert table.column("id").to_pylist() == ["bad:1", "7"]
    got = {r["line"]: r["reason"] for r in report.rejects}
    assert got[2].startswith("malformed JSON")
    assert got[3] == "field 'text' is int, not a string"
    assert got[4] == "missing field 'text'"
    assert got[5].startswith("invalid UTF-8")
    assert got[7] == "not a JSON object (list)"
    assert set(got) == {2, 3, 4, 5, 7}  # the blank line 6 is not a record
    assert report.records == 7 and report.rejected == 5
    assert all(r["source"] == str(path) for r in report.rejects)


def test_truncated_gzip_keeps_records_before_the_fault(tmp_path):
    lines = [json.dumps({"text": "x" * 200 + str(i)}) for i in range(20000)]
    full = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(full[:-300])
    table, report = _read(path)
    assert report.status == "truncated" and "EOFError" in report.error
    assert 0 < table.num_rows < 20000
    # what was kept is exactly a prefix of the file
    assert table.column("text").to_pylist() == [json.loads(s)["text"] for s in lines[:table.num_rows]]
    assert report.records == table.num_rows + report.rejected
    assert any(r["line"] is None and r["reason"].startswith("truncated") for r in report.rejects)


def test_truncated_zstd_is_reported(tmp_path):
    lines = [json.dumps({"text": f"doc {i} " * 40}) for i in range(5000)]
    full = zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(full[: len(full) // 2])
    _, report = _read(path)
    assert report.status == "truncated"


def test_empty_file_is_reported_not_fatal(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"")
    table, report = _read(path)
    assert table is None and report.status == "empty" and report.rejects[0]["line"] is None


def test_parquet_with_field_mapping_and_null_text(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "body": ["one", None, "three"],
                             "lang": ["en", "en", "fr"]}), path)
    spec = SourceSpec(path=str(path), fields={"id": "doc_id", "text": "body", "domain": "lang"})
    table, report = _read(path, fmt="parquet", spec=spec)
    assert table.column("id").to_pylist() == ["a", "c"]
    assert table.column("domain").to_pylist() == ["en", "fr"]
    assert report.rejected == 1 and report.rejects[0]["line"] == 1


def test_parquet_derived_ids_keep_row_numbers_after_rejects(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    table, _ = _read(path, fmt="parquet", label="p")
    assert table.column("id").to_pylist() == ["p:0", "p:2"]


def test_sft_records_read_with_response_lists(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "responses": ["4", "four"],
                                "response_sources": ["m1", "m2"]}) + "\n"
                    + json.dumps({"prompt": "x", "responses": []}) + "\n")
    spec = SourceSpec(path=str(path), kind="sft")
    table, report = _read(path, spec=spec)
    assert table.column("responses").to_pylist() == [["4", "four"]]
    assert table.column("response_sources").to_pylist() == [["m1", "m2"]]
    assert report.rejected == 1 and "non-empty list" in report.rejects[0]["reason"]
