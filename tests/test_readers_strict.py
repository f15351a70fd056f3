"""Readers, strictly: every line or row is kept byte-for-byte or rejected with a reason.

Each test here reproduces a defect of the readers as they were (issue 10):
invalid UTF-8 passing the fast path, lone surrogates and deep nesting
crashing a run, truncated archives losing a chunk before the fault, nested
Parquet columns losing the whole file, an int ``text`` quietly cast.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import SourceSpec, parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import KEY_POS_MASK, ROW_KEY


def _read(path: Path, fmt: str = "jsonl", batch_size: int = 1000, index: int = 0,
          **spec) -> tuple[pa.Table | None, FileReport]:
    spec = SourceSpec(path=str(path), **spec)
    report = FileReport(path=str(path))
    task = InputTask(index=index, source_index=0, path=str(path), format=fmt, label="src")
    tables = list(read_task(task, spec, report, batch_size))
    for t in tables:
        t.validate(full=True)
    return (pa.concat_tables(tables) if tables else None), report


def _lines_of(table: pa.Table) -> list[int]:
    return [k & KEY_POS_MASK for k in table.column(ROW_KEY).to_pylist()]


def _reasons(report: FileReport) -> dict[int, str]:
    return {r["line"]: r["reason"] for r in report.rejects if r["line"] is not None}


def _good(i: int) -> bytes:
    return json.dumps({"text": f"good {i}", "meta": {"n": i}}).encode()


# ---- strict decoding ---------------------------------------------------------------------

def test_invalid_utf8_in_an_otherwise_valid_file_is_rejected_not_kept(tmp_path):
    path = tmp_path / "u.jsonl"
    lines = [_good(i) for i in range(6)]
    lines[2] = b'{"text": "bad \xff byte"}'
    lines[4] = b'{"text": "fine", "other": "bad \xc3\x28 in an ignored field"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    table, report = _read(path)
    assert table.column("text").to_pylist() == ["good 0", "good 1", "good 3", "good 5"]
    assert _lines_of(table) == [1, 2, 4, 6]
    reasons = _reasons(report)
    assert set(reasons) == {3, 5} and all(r.startswith("invalid UTF-8") for r in reasons.values())
    assert report.records == 6 and report.rejected == 2


def test_lone_surrogate_is_a_reject_not_a_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join([
        _good(0),
        b'{"text": "lone \\ud800 high"}',
        b'{"text": "ok", "x": "lone \\udc00 low in an ignored field"}',
        b'{"text": "a pair \\ud83d\\ude00 is fine"}',
        b'{"text": "escaped backslash \\\\ud800 is just text"}',
    ]) + b"\n")
    table, report = _read(path)
    assert table.column("text").to_pylist() == [
        "good 0", "a pair \U0001F600 is fine", "escaped backslash \\ud800 is just text"]
    reasons = _reasons(report)
    assert set(reasons) == {2, 3} and all("lone surrogate" in r for r in reasons.values())


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deep_nesting_is_judged_the_same_whatever_the_neighbouring_lines(tmp_path):
    deep_ignored = b'{"text": "deep but ignored", "z": ' + _deep(50_000).encode() + b"}"
    deep_carried = b'{"text": "deep carried", "meta": ' + _deep(50_000).encode() + b"}"
    # alone, the block goes through pyarrow; with a malformed neighbour, line by line
    for neighbour in (_good(9), b"{not json"):
        path = tmp_path / "deep.jsonl"
        path.write_bytes(b"\n".join([_good(0), deep_ignored, deep_carried, neighbour]) + b"\n")
        table, report = _read(path, columns=["meta"])
        texts = table.column("text").to_pylist()
        assert texts[:2] == ["good 0", "deep but ignored"]
        assert "nesting too deep" in _reasons(report)[3]
        assert report.records == 4 and report.records == table.num_rows + report.rejected


def test_a_first_line_null_does_not_crash_the_process(tmp_path):
    # pyarrow 25's JSON reader dies with SIGSEGV when a block's first value is `null`
    path = tmp_path / "n.jsonl"
    path.write_bytes(b"null\n" + _good(1) + b"\n")
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_readers_strict import _read;"
            "from pathlib import Path; t, r = _read(Path(sys.argv[1]));"
            "print(t.num_rows, r.rejected, r.rejects[0]['reason'])")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["1", "1", "not", "a", "JSON", "object", "(NoneType)"]


def test_a_null_line_at_a_parse_chunk_start_does_not_crash_the_process(tmp_path):
    # pyarrow parses a block in 1 MiB chunks; one that starts with `null` crashes it too
    good = (json.dumps({"text": "x" * 90}) + "\n").encode()
    head = good * ((1 << 20) // len(good) - 1)
    fill = (1 << 20) - len(head) - 50
    path = tmp_path / "n.jsonl"
    path.write_bytes(head + b'{"text": "' + b"y" * (fill - 13) + b'"}\n'
                     + b"null" + b" " * 200 + b"\n" + good * 100)
    n_head = len(head) // len(good)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_readers_strict import _read;"
            "from pathlib import Path; t, r = _read(Path(sys.argv[1]));"
            "print(t.num_rows, r.rejected, r.rejects[0]['line'])")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(n_head + 101), "1", str(n_head + 2)]


def test_two_values_on_one_line_do_not_shift_line_numbers_past_a_blank_line(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_bytes(b'{"text": "a"}{"text": "b"}\n\n{"text": "c"}\n')
    table, report = _read(path)
    assert table.column("text").to_pylist() == ["c"] and _lines_of(table) == [3]
    assert _reasons(report)[1].startswith("malformed JSON")


def test_a_field_read_twice_is_ambiguous_and_rejected(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_bytes(b'{"text": "a", "text": "b"}\n{"text": "c", "x": 1, "x": 2}\n')
    table, report = _read(path)
    assert table.column("text").to_pylist() == ["c"]
    assert _reasons(report) == {1: "field 'text' appears more than once"}


def test_byte_order_mark_at_file_start_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _good(0) + b"\n" + b"\xef\xbb\xbf" + _good(1) + b"\n")
    table, report = _read(path)
    assert table.column("text").to_pylist() == ["good 0"]
    assert 2 in _reasons(report)  # a BOM inside the file is not JSON


def _fast_and_careful(tmp_path: Path, lines: list[bytes], **spec) -> tuple[pa.Table, pa.Table]:
    """Read ``lines`` alone (fast path) and after a malformed line (careful path)."""
    a, b = tmp_path / "fast.jsonl", tmp_path / "careful.jsonl"
    a.write_bytes(b"\n".join(lines) + b"\n")
    b.write_bytes(b"\n".join([b"{broken"] + lines) + b"\n")
    fast, _ = _read(a, **spec)
    careful, rep = _read(b, **spec)
    assert _reasons(rep) == {1: _reasons(rep)[1]}
    return fast.drop_columns(["id", ROW_KEY]), careful.drop_columns(["id", ROW_KEY])


def test_fast_and_careful_paths_agree_on_carried_columns(tmp_path):
    lines = [json.dumps({"text": t, "meta": m, "domain": d}, ensure_ascii=False).encode()
             for t, m, d in [("é ü 日本", "plain string", "x"), ("b", None, None),
                             ("c\u0000d", "tab\there", "y"), ("e", "é", "z")]]
    fast, careful = _fast_and_careful(tmp_path, lines, columns=["meta"])
    assert fast.equals(careful)
    # non-string JSON values only the careful path can carry: compact JSON text
    path = tmp_path / "nested.jsonl"
    path.write_bytes(b'{"text": "t", "meta": {"a": [1, 2.50, "\xc3\xa9"], "b": true}, '
                     b'"id": 12, "domain": false}\n')
    table, _ = _read(path, columns=["meta"])
    assert table.column("meta").to_pylist() == ['{"a":[1,2.5,"\u00e9"],"b":true}']
    assert table.column("id").to_pylist() == ["12"]
    assert table.column("domain").to_pylist() == ["false"]


def test_fast_and_careful_paths_agree_on_sft_response_sources(tmp_path):
    lines = [json.dumps(r).encode() for r in [
        {"prompt": "p1", "responses": ["a", "b"], "response_sources": ["m1", "m2"]},
        {"prompt": "p2", "responses": ["a", "b"], "response_sources": ["m1"]},  # too short
        {"prompt": "p3", "responses": ["a", None]},  # null response
        {"prompt": "p4", "responses": ["a"], "response_sources": None},
    ]]
    a = tmp_path / "sft.jsonl"
    a.write_bytes(b"\n".join(lines) + b"\n")
    table, report = _read(a, kind="sft")
    assert table.column("prompt").to_pylist() == ["p1", "p4"]
    assert set(_reasons(report)) == {2, 3}
    fast, careful = _fast_and_careful(tmp_path, [lines[0], lines[3]], kind="sft")
    assert fast.equals(careful)


def test_rejected_lines_keep_their_keys_unused_and_kept_lines_keep_theirs(tmp_path):
    path = tmp_path / "k.jsonl"
    rng = np.random.default_rng(0)
    lines, good = [], []
    for i in range(1, 301):
        if rng.random() < 0.2:
            lines.append(b'{"text": "bad \xff"}')
        elif rng.random() < 0.1:
            lines.append(b"")
        else:
            lines.append(_good(i))
            good.append(i)
    path.write_bytes(b"\n".join(lines) + b"\n")
    table, report = _read(path, batch_size=7, index=3)
    assert _lines_of(table) == good
    assert {k >> 40 for k in table.column(ROW_KEY).to_pylist()} == {3}
    assert not set(_reasons(report)) & set(good)
    assert report.records == len(good) + report.rejected


# ---- truncated and corrupt archives -------------------------------------------------------

def _corpus_lines(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    words = "mill grain river stone flour wheel water season bread field".split()
    return [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 80))) + f" #{i}"})
            .encode() for i in range(n)]


def _compress(kind: str, body: bytes) -> bytes:
    if kind == "gz":
        return gzip.compress(body, compresslevel=1)
    return zstandard.ZstdCompressor(level=3).compress(body)


def _recoverable(kind: str, data: bytes) -> bytes:
    """What the library itself decodes from a cut file, fed whole (multi-member aware)."""
    out = b""
    while data:
        d = zlib.decompressobj(wbits=31) if kind == "gz" else \
            zstandard.ZstdDecompressor().decompressobj()
        out += d.decompress(data)
        data = d.unused_data if d.eof else b""
    return out


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("members", [1, 3])
def test_truncated_archive_keeps_every_complete_line_before_the_cut(tmp_path, kind, members):
    lines = _corpus_lines(12_000)
    per = len(lines) // members
    blob = b"".join(_compress(kind, b"\n".join(lines[i * per:(i + 1) * per]) + b"\n")
                    for i in range(members))
    cut = blob[: int(len(blob) * 0.6)]
    path = tmp_path / f"cut.jsonl.{kind}"
    path.write_bytes(cut)
    recovered = _recoverable(kind, cut)
    complete = recovered[: recovered.rfind(b"\n") + 1].count(b"\n")
    table, report = _read(path)
    assert report.status == "truncated" and "truncated" in report.error
    assert complete > 0.5 * len(lines)
    assert table.num_rows == complete  # down to the last complete line
    assert table.column("text").to_pylist() == [json.loads(s)["text"] for s in lines[:complete]]
    reasons = _reasons(report)
    assert list(reasons.values()) == ["incomplete last line of a truncated file"]
    assert report.records == complete + 1 and report.rejected == 1


def test_truncated_zstd_keeps_the_output_of_the_read_that_hits_the_end(tmp_path):
    # the cut lands a little past the first MiB of compressed input: the last read
    # decodes a few lines and then meets the end of the file
    rng = random.Random(3)
    lines = [json.dumps({"text": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789 ",
                                                     k=200))}).encode() for _ in range(12_000)]
    blob = _compress("zst", b"\n".join(lines) + b"\n")
    assert len(blob) > (1 << 20) + 40_000
    cut = blob[: (1 << 20) + 30_000]
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(cut)
    recovered = _recoverable("zst", cut)
    complete = recovered[: recovered.rfind(b"\n") + 1].count(b"\n")
    table, report = _read(path)
    assert report.status == "truncated" and table.num_rows == complete


def test_corrupt_gzip_keeps_everything_zlib_decodes_before_the_bad_byte(tmp_path):
    lines = _corpus_lines(20_000, seed=1)
    blob = bytearray(_compress("gz", b"\n".join(lines) + b"\n"))
    pos = len(blob) // 2
    blob[pos:pos + 8] = bytes(b ^ 0xFF for b in blob[pos:pos + 8])
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(blob))
    # the reference: zlib fed from just before the damage, one byte at a time
    d = zlib.decompressobj(wbits=31)
    good = bytearray(d.decompress(bytes(blob[: pos - 1])))
    try:
        for i in range(pos - 1, len(blob)):
            good += d.decompress(bytes(blob[i:i + 1]))
    except zlib.error:
        pass
    n_lines = good.count(b"\n") + (0 if good.endswith(b"\n") else 1)
    table, report = _read(path)
    assert report.status == "corrupt" and "corrupt gzip data" in report.error
    # every line zlib gave before it noticed the damage was read, kept or rejected; deflate
    # notices late, so lines after the damaged byte may be garbage that still parses
    assert report.records == n_lines
    intact = good[: good.find(lines[len(lines) // 3])].count(b"\n")
    assert table.column("text").to_pylist()[:intact] == \
        [json.loads(s)["text"] for s in lines[:intact]]


def test_corrupt_zstd_is_reported_with_a_reason_and_keeps_a_prefix(tmp_path):
    lines = _corpus_lines(20_000, seed=2)
    blob = bytearray(_compress("zst", b"\n".join(lines) + b"\n"))
    pos = len(blob) // 2
    blob[pos:pos + 64] = bytes(64)
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(bytes(blob))
    table, report = _read(path)
    assert report.status == "corrupt" and "corrupt zstd data" in report.error
    n = table.num_rows
    assert n > 0.2 * len(lines)
    assert table.column("text").to_pylist() == [json.loads(s)["text"] for s in lines[:n]]


# ---- Parquet types ------------------------------------------------------------------------

def test_parquet_int_text_is_rejected_whole_file_never_cast(tmp_path):
    path = tmp_path / "int.parquet"
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), path)
    table, report = _read(path, fmt="parquet")
    assert table is None
    assert report.records == 3 and report.rejected == 3 and report.status == "rejected"
    assert "column 'text' is int64, not a string" in report.rejects[0]["reason"]
    assert report.rejects[0]["rows"] == 3


def test_parquet_invalid_utf8_rows_are_rejected_per_row(tmp_path):
    path = tmp_path / "bad.parquet"
    text = pa.array([b"ok", b"bad \xff", b"fine"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": text}), path)
    table, report = _read(path, fmt="parquet")
    assert table.column("text").to_pylist() == ["ok", "fine"] and _lines_of(table) == [0, 2]
    assert _reasons(report) == {1: "invalid UTF-8 in column 'text'"}


def test_parquet_invalid_utf8_inside_a_nested_column_rejects_only_that_row(tmp_path):
    path = tmp_path / "nested-bad.parquet"
    items = pa.array([b"a", b"\xff", b"c", b"d"], pa.binary()).view(pa.string())
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 2, 4], pa.int32()), items)
    pq.write_table(pa.table({"text": ["one", "two", "three"], "tags": tags}), path)
    table, report = _read(path, fmt="parquet", columns=["tags"])
    assert table.column("text").to_pylist() == ["one", "three"]
    assert table.column("tags").to_pylist() == [["a"], ["c", "d"]]
    assert _reasons(report) == {1: "invalid UTF-8 in column 'tags'"}


# ---- end to end: shards pass full validation ----------------------------------------------

HOSTILE_LINES = [
    b'{"id": "1", "text": "plain"}',
    b'{"id": "2", "text": "invalid \xff utf8"}',
    b'{"id": "3", "text": "lone \\ud800"}',
    b'{"id": "4", "text": "deep", "z": ' + _deep(20_000).encode() + b"}",
    b'{"id": "5", "text": "plain"}',  # an exact duplicate of id 1
    b"null",
    b'{"id": "6", "text": "unicode \xc3\xa9"}',
]


def test_run_with_hostile_input_writes_valid_shards_and_reconciles(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\n".join(HOSTILE_LINES) + b"\n")
    (src / "b.jsonl").write_bytes(b"\n".join([HOSTILE_LINES[-1], HOSTILE_LINES[1]]) + b"\n")
    body = {"name": "hostile", "sources": [{"path": str(src)}],
            "stages": [{"stage": "exact_dedup"}],
            "output": {"path": str(tmp_path / "out")}, "engine": {"kind": "local"}}
    manifest = run_recipe(parse_recipe(body), progress=False, report=False)
    counts = manifest["counts"]
    assert counts["reconciled"] and counts["read"] == 9 and counts["rejected"] == 4
    tables = [pq.read_table(tmp_path / "out" / s["path"]) for s in manifest["shards"]]
    for t in tables:
        t.validate(full=True)
    kept = pa.concat_tables(tables)
    assert sorted(kept.column("text").to_pylist()) == ["deep", "plain", "unicode é"]
    assert counts["kept"] == 3 and counts["dropped"] == 2  # exact copies, across files too


# ---- nested columns -----------------------------------------------------------------------

def _hf_table(n: int = 40) -> pa.Table:
    """Shaped like a Hugging Face export: large_string text, int ids, nested metadata."""
    meta_t = pa.struct([("url", pa.string()), ("score", pa.float64()),
                        ("langs", pa.list_(pa.string()))])
    return pa.table({
        "id": pa.array(range(n), pa.int64()),
        "text": pa.array([f"document {i} " + "é" * (i % 5) for i in range(n)], pa.large_string()),
        "meta": pa.array([{"url": f"https://x/{i}", "score": i / 7, "langs": ["en", "fr"][: i % 3]}
                          for i in range(n)], meta_t),
        "tags": pa.array([[f"t{j}" for j in range(i % 4)] for i in range(n)],
                         pa.list_(pa.string())),
        "counts": pa.array([[("a", i), ("b", i * 2)] for i in range(n)],
                           pa.map_(pa.string(), pa.int64())),
    })


def test_parquet_nested_columns_are_carried_with_their_arrow_types(tmp_path):
    path = tmp_path / "hf.parquet"
    src = _hf_table()
    pq.write_table(src, path, row_group_size=16)
    table, report = _read(path, fmt="parquet", batch_size=7, columns=["meta", "tags", "counts"])
    assert report.status == "ok" and report.records == 40 and report.rejected == 0
    for c in ("meta", "tags", "counts"):
        assert table.schema.field(c).type == src.schema.field(c).type
        assert table.column(c).to_pylist() == src.column(c).to_pylist()
    assert table.schema.field("text").type == pa.string()
    assert table.column("text").to_pylist() == src.column("text").to_pylist()
    assert table.column("id").to_pylist() == [str(i) for i in range(40)]


def test_hugging_face_parquet_runs_end_to_end_with_nested_columns(tmp_path):
    src_dir = tmp_path / "hf"
    src_dir.mkdir()
    full = _hf_table(60)
    pq.write_table(full.slice(0, 30), src_dir / "train-00000.parquet", row_group_size=8)
    pq.write_table(full.slice(30), src_dir / "train-00001.parquet", row_group_size=8)
    body = {"name": "hf", "sources": [{"path": str(src_dir), "columns": ["meta", "tags", "counts"],
                                       "fields": {"id": None}}],
            "stages": [{"stage": "exact_dedup"}, {"stage": "text_stats"}],
            "output": {"path": str(tmp_path / "out")},
            "engine": {"kind": "local", "batch_size": 16}}
    manifest = run_recipe(parse_recipe(body), progress=False, report=False)
    counts = manifest["counts"]
    assert counts["reconciled"] and counts["read"] == 60 and counts["kept"] == 60
    assert all(f["status"] == "ok" for f in manifest["files"])
    types = {f["name"]: f["type"] for f in manifest["schema"]}
    as_read = pq.read_schema(src_dir / "train-00000.parquet")  # Parquet names list items
    for c in ("meta", "tags", "counts"):
        assert types[c] == str(as_read.field(c).type)
    tables = [pq.read_table(tmp_path / "out" / s["path"]) for s in manifest["shards"]]
    for t in tables:
        t.validate(full=True)
    kept = pa.concat_tables(tables).sort_by([(ROW_KEY, "ascending")])
    for c in ("meta", "tags", "counts"):
        assert kept.column(c).to_pylist() == full.column(c).to_pylist()
