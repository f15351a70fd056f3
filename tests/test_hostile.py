"""Hostile input, property-based: arbitrary bytes, JSON values and Arrow tables.

Invariants, whatever the input: no crash; every kept record is valid UTF-8 and
equal to the text of its input line or row; every other non-blank line (every
other row) is a reject with a reason; read = kept + rejected; every table and
shard passes ``pyarrow``'s full validation; and the fast and careful JSONL
paths judge every line the same (a file read in one block and line by line
keeps and rejects the same lines). The same invariants hold on the local, Dask
and Beam engines for fixed generated corpora.

Hypothesis runs derandomized without an example database, so CI is
deterministic; example counts are sized for the whole module to run in well
under two minutes on a loaded 2-core box.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gristmill.pipeline import readers
from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import SourceSpec, parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import KEY_POS_MASK, ROW_KEY

PROFILE = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies ---------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)

TRICKY = [
    b"null", b" null ", b"[]", b'"a string"', b"42", b"true", b"{}",
    b'{"text": "lone \\ud800"}', b'{"text": "ok", "x": "\\udfff"}',
    b'{"text": "pair \\ud83d\\ude00"}', b'{"text": "\\u0000nul"}',
    b'{"text": "a", "text": "b"}', b'{"text": "a", "x": 1, "x": 2}',
    b'{"text": "a"}{"text": "b"}', b'{"text": "a"} {"text": "b"}', b'{"text": "a"}\r{"text": "b"}',
    b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "nan", "x": NaN}', b'{"text": "inf", "x": 1e400}',
    b'{"text": "big", "x": ' + b"9" * 5000 + b"}",
    b'{"text": "deep", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"text": "deep", "meta": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"text": "ctrl \x01 raw"}', b'{"text": "cr \r raw"}', b'{"text": 5}', b'{"text": null}',
    b'{"text": "trailing",}', b"\x0c", b'{"text": "a\xc3"}', b'{"text": "\xed\xa0\x80"}',
    b'{"text": "meta nan", "meta": NaN}', b'{"text": "id float", "id": 1.5e3}',
]


@st.composite
def valid_lines(draw) -> bytes:
    obj: dict = {"text": draw(st.text(max_size=30))}
    for key in draw(st.sets(st.sampled_from(["id", "domain", "meta", "other"]))):
        obj[key] = draw(json_values)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def mutated_lines(draw) -> bytes:
    line = bytearray(draw(valid_lines()))
    i = draw(st.integers(0, len(line)))
    op = draw(st.sampled_from(["cut", "insert", "flip"]))
    if op == "cut":
        del line[i:]
    elif op == "insert":
        line[i:i] = draw(st.binary(min_size=1, max_size=3))
    elif i < len(line):
        line[i] ^= draw(st.integers(1, 255))
    return bytes(line)


jsonl_lines = st.one_of(
    valid_lines(), valid_lines(), mutated_lines(), st.sampled_from(TRICKY),
    st.binary(max_size=30), st.sampled_from([b"", b"  ", b"\t\r"]),
).map(lambda b: b.replace(b"\n", b" "))


# ---- invariants ---------------------------------------------------------------------------

def _read(path: Path, fmt: str = "jsonl", batch_size: int = 5, **spec):
    spec = SourceSpec(path=str(path), **spec)
    report = FileReport(path=str(path))
    task = InputTask(index=2, source_index=0, path=str(path), format=fmt, label="h")
    tables = list(read_task(task, spec, report, batch_size))
    for t in tables:
        t.validate(full=True)
        assert t.num_rows <= batch_size
    return (pa.concat_tables(tables) if tables else None), report


def _kept_lines(table: pa.Table | None) -> list[int]:
    if table is None:
        return []
    keys = table.column(ROW_KEY).to_pylist()
    assert {k >> 40 for k in keys} <= {2}
    return [k & KEY_POS_MASK for k in keys]


def _loads(text: str):
    """The reference reading of a line: Python's json without its own limits on depth and
    integer length (numbers kept as their text)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
    finally:
        sys.setrecursionlimit(limit)


def check_jsonl_invariants(lines: list[bytes], table: pa.Table | None,
                           report: FileReport) -> None:
    first = lines[0][3:] if lines and lines[0].startswith(b"\xef\xbb\xbf") else None
    raw = [first if i == 0 and first is not None else s for i, s in enumerate(lines)]
    nonblank = {i + 1 for i, s in enumerate(raw) if s.strip(b" \t\r")}
    kept = _kept_lines(table)
    rejected = [r["line"] for r in report.rejects if r["line"] is not None]
    assert len(set(kept)) == len(kept) and len(set(rejected)) == len(rejected)
    assert not set(kept) & set(rejected)
    assert set(kept) | set(rejected) == nonblank
    assert all(r["reason"] and r["source"] == report.path for r in report.rejects)
    assert report.records == len(nonblank) == len(kept) + report.rejected
    if table is None:
        return
    for line, text in zip(kept, table.column("text").to_pylist(), strict=True):
        obj = _loads(raw[line - 1].decode("utf-8"))
        assert obj["text"] == text
        text.encode("utf-8")  # raises on a lone surrogate


def _write_and_read(tmp: Path, lines: list[bytes], name: str = "in.jsonl", **spec):
    path = tmp / name
    path.write_bytes(b"".join(s + b"\n" for s in lines))
    return _read(path, **spec)


# ---- JSONL ---------------------------------------------------------------------------------

@PROFILE
@given(lines=st.lists(jsonl_lines, max_size=25))
def test_arbitrary_lines_are_kept_verbatim_or_rejected_with_a_reason(lines):
    with tempfile.TemporaryDirectory() as tmp:
        table, report = _write_and_read(Path(tmp), lines, columns=["meta"])
        check_jsonl_invariants(lines, table, report)
        # line by line (a block per line): the fast path judges each line on its own
        old = readers.BLOCK_BYTES, readers.READ_CHUNK
        readers.BLOCK_BYTES, readers.READ_CHUNK = 1, 16
        try:
            table1, report1 = _write_and_read(Path(tmp), lines, columns=["meta"])
        finally:
            readers.BLOCK_BYTES, readers.READ_CHUNK = old
        # one block, parsed by pyarrow in chunks of 64 bytes (lines straddle chunks)
        old_chunk, readers.PARSE_CHUNK = readers.PARSE_CHUNK, 64
        try:
            table2, report2 = _write_and_read(Path(tmp), lines, columns=["meta"])
        finally:
            readers.PARSE_CHUNK = old_chunk
        assert table2 is None or table2.equals(table)
        assert report2.rejects == report.rejects
        check_jsonl_invariants(lines, table1, report1)
        assert _kept_lines(table) == _kept_lines(table1)
        if table is not None:
            assert table.equals(table1)
        assert ({r["line"]: r["reason"] for r in report.rejects}
                == {r["line"]: r["reason"] for r in report1.rejects})


@PROFILE
@given(records=st.lists(st.fixed_dictionaries(
    {"text": json_values, "meta": json_values, "id": json_values}), max_size=15),
    ascii_only=st.booleans())
def test_arbitrary_json_values_follow_the_carried_column_rule(records, ascii_only):
    lines = [json.dumps(r, ensure_ascii=ascii_only).encode() for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        table, report = _write_and_read(Path(tmp), lines, columns=["meta"])
    check_jsonl_invariants(lines, table, report)
    want = [i + 1 for i, r in enumerate(records) if isinstance(r["text"], str)]
    assert _kept_lines(table) == want
    if table is None:
        return

    def as_text(v):
        return None if v is None else v if isinstance(v, str) else json.dumps(
            v, ensure_ascii=False, separators=(",", ":"))

    got = table.to_pylist()
    for row, line in zip(got, want, strict=True):
        rec = records[line - 1]
        assert row["meta"] == as_text(rec["meta"])
        assert row["id"] == (f"h:{line}" if rec["id"] is None else as_text(rec["id"]))


# ---- Parquet -------------------------------------------------------------------------------

TEXT_TYPES = {
    "string": (pa.string(), st.text(max_size=20)),
    "large_string": (pa.large_string(), st.text(max_size=20)),
    "int64": (pa.int64(), st.integers(-(2 ** 63), 2 ** 63 - 1)),
    "binary": (pa.binary(), st.binary(max_size=10)),
    "list": (pa.list_(pa.string()), st.lists(st.text(max_size=5), max_size=3)),
    "float": (pa.float64(), st.floats()),
}
META_TYPES = {
    "struct": (pa.struct([("a", pa.int64()), ("b", pa.list_(pa.string()))]),
               st.fixed_dictionaries({"a": st.none() | st.integers(-9, 9),
                                      "b": st.none() | st.lists(st.text(max_size=4), max_size=3)})),
    "map": (pa.map_(pa.string(), pa.float64()),
            st.dictionaries(st.text(max_size=4), st.floats(allow_nan=False), max_size=3)
            .map(lambda d: list(d.items()))),
    "large_list": (pa.large_list(pa.large_string()), st.lists(st.text(max_size=4), max_size=3)),
    "string": (pa.string(), st.text(max_size=8)),
}


@st.composite
def arrow_tables(draw) -> tuple[pa.Table, set[int]]:
    """A table with a `text` column of any type, nested `meta`, and rows whose text bytes
    are made invalid UTF-8 (their indexes returned)."""
    n = draw(st.integers(0, 25))
    t_name = draw(st.sampled_from(sorted(TEXT_TYPES)))
    t_type, t_vals = TEXT_TYPES[t_name]
    m_type, m_vals = META_TYPES[draw(st.sampled_from(sorted(META_TYPES)))]
    text = draw(st.lists(st.none() | t_vals, min_size=n, max_size=n))
    meta = draw(st.lists(st.none() | m_vals, min_size=n, max_size=n))
    broken: set[int] = set()
    if pa.types.is_string(t_type) and n and draw(st.booleans()):
        broken = set(draw(st.sets(st.integers(0, n - 1), max_size=3)))
        raw = [None if v is None else (v.encode() + b"\xff" if i in broken else v.encode())
               for i, v in enumerate(text)]
        col = pa.array(raw, pa.binary()).view(pa.string())
        broken = {i for i in broken if text[i] is not None}
    else:
        col = pa.array(text, t_type)
    meta_col = pa.array(meta, m_type)
    if pa.types.is_string(m_type) and n and draw(st.booleans()):
        bad_meta = {i for i in draw(st.sets(st.integers(0, n - 1), max_size=2))
                    if meta[i] is not None}
        meta_col = pa.array([None if v is None else v.encode() + (b"\xc3" if i in bad_meta else b"")
                             for i, v in enumerate(meta)], pa.binary()).view(pa.string())
        broken |= bad_meta
    ids = pa.array(draw(st.lists(st.none() | st.text(max_size=5), min_size=n, max_size=n)),
                   pa.string())
    return pa.table({"id": ids, "text": col, "meta": meta_col}), broken


@PROFILE
@given(data=arrow_tables(), row_group=st.integers(1, 10), batch=st.integers(1, 8))
def test_arbitrary_arrow_tables_are_kept_unchanged_or_rejected_never_cast(data, row_group, batch):
    src, broken = data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        pq.write_table(src, path, row_group_size=row_group)
        as_read = pq.read_schema(path)
        table, report = _read(path, fmt="parquet", batch_size=batch, columns=["meta"])
        n = src.num_rows
        assert report.records == n == len(_kept_lines(table)) + report.rejected
        text_type = src.schema.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            assert table is None and report.rejected == n and report.status == "rejected"
            assert f"column 'text' is {as_read.field('text').type}" in report.rejects[0]["reason"]
            return
        texts = src.column("text").cast(pa.binary()).to_pylist()
        want = [i for i in range(n) if texts[i] is not None and i not in broken]
        assert _kept_lines(table) == want
        rejected = {r["line"]: r["reason"] for r in report.rejects if r["line"] is not None}
        assert set(rejected) == set(range(n)) - set(want) and all(rejected.values())
        if table is None:
            return
        assert table.column("text").to_pylist() == [texts[i].decode() for i in want]
        assert table.schema.field("meta").type == as_read.field("meta").type
        assert table.column("meta").to_pylist() == [src.column("meta").take([i])[0].as_py()
                                                    for i in want]
        out = Path(tmp) / "shard.parquet"
        pq.write_table(table, out)
        pq.read_table(out).validate(full=True)


# ---- the same invariants on every engine --------------------------------------------------

def _engine_corpus(folder: Path, lines: list[bytes], meta_table: pa.Table) -> list[bytes]:
    folder.mkdir(parents=True)
    half = len(lines) // 2
    (folder / "a.jsonl").write_bytes(b"".join(s + b"\n" for s in lines[:half]))
    body = b"".join(s + b"\n" for s in lines[half:])
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(body)[:-7])  # truncated at the end
    pq.write_table(meta_table, folder / "c.parquet", row_group_size=4)
    return lines


def _run(folder: Path, out: Path, **engine) -> dict:
    body = {"name": "hostile", "seed": 1,
            "sources": [{"path": [str(folder / "a.jsonl"), str(folder / "b.jsonl.gz")],
                         "columns": ["meta"]},
                        {"path": str(folder / "c.parquet"), "columns": ["tags"]}],
            "stages": [{"stage": "exact_dedup"}, {"stage": "text_stats"}],
            "output": {"path": str(out), "shard_size": "8KB"},
            "engine": {"batch_size": 8, **engine}}
    return run_recipe(parse_recipe(body), progress=False, report=False)


def _outcome(out: Path, manifest: dict) -> dict:
    counts = manifest["counts"]
    assert counts["reconciled"]
    assert counts["read"] == counts["kept"] + counts["dropped"] + counts["rejected"]
    rows = []
    for s in manifest["shards"]:
        t = pq.read_table(out / s["path"])
        t.validate(full=True)
        rows += [(r[ROW_KEY], r["text"], r.get("meta"), r.get("tags")) for r in t.to_pylist()]
    rejects = sorted((r["source"], -1 if r["line"] is None else r["line"], r["reason"])
                     for f in manifest["rejects"]
                     for r in map(json.loads, (out / f).read_text().splitlines()))
    return {"rows": sorted(rows), "rejects": rejects,
            "counts": {k: v for k, v in counts.items() if k != "stages"}}


@pytest.fixture(scope="module")
def dask_scheduler():
    """One loopback Dask cluster (two worker processes) for every generated corpus."""
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, host="127.0.0.1") as cluster:
        yield cluster.scheduler_address


@settings(derandomize=True, database=None, deadline=None, max_examples=2,
          suppress_health_check=list(HealthCheck))
@given(lines=st.lists(jsonl_lines, min_size=20, max_size=40),
       tags=st.lists(st.none() | st.lists(st.text(max_size=4), max_size=3), min_size=12,
                     max_size=12))
def test_local_dask_and_beam_keep_and_reject_the_same_hostile_records(dask_scheduler, lines,
                                                                     tags):
    pytest.importorskip("apache_beam")
    engines = {"local": {"kind": "local", "workers": 1},
               "dask": {"kind": "dask", "scheduler": dask_scheduler, "shuffle_partitions": 3},
               "beam": {"kind": "beam", "workers": 1, "shuffle_partitions": 2}}
    meta_table = pa.table({"text": [f"parquet row {i}" if i % 5 else None for i in range(12)],
                           "tags": pa.array(tags, pa.list_(pa.string()))})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        _engine_corpus(folder, lines, meta_table)
        got = {}
        for name, engine in engines.items():
            out = Path(tmp) / f"out-{name}"
            got[name] = _outcome(out, _run(folder, out, **engine))
        assert got["dask"] == got["local"]
        assert got["beam"] == got["local"]
        local = got["local"]
        assert local["rejects"] and local["counts"]["kept"] > 0
        # the Parquet rows with a null text are rejected by row number (0, 5 and 10)
        assert {r[1] for r in local["rejects"] if r[0].endswith("c.parquet")} == {0, 5, 10}
