"""Carried columns whose types differ between input files: one schema per run.

Every shard of a run has the manifest's ``schema``; the types join without
loss where Arrow can (``carried_schema.promote``), and a conflicting column is
carried as JSON text in every file, never cast with loss, never rejected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gristmill.pipeline.carried_schema import (
    JSON_TEXT,
    conform,
    json_text,
    promote,
    unify_column,
)
from gristmill.pipeline.recipe import parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import ROW_KEY

LOSSLESS = [
    (pa.int32(), pa.int64(), pa.int64()),
    (pa.int8(), pa.uint8(), pa.int16()),
    (pa.uint32(), pa.int32(), pa.int64()),
    (pa.int16(), pa.float32(), pa.float32()),
    (pa.int32(), pa.float32(), pa.float64()),
    (pa.float32(), pa.float64(), pa.float64()),
    (pa.null(), pa.struct([("a", pa.int8())]), pa.struct([("a", pa.int8())])),
    (pa.string(), pa.large_string(), pa.large_string()),
    (pa.dictionary(pa.int32(), pa.string()), pa.string(), pa.string()),
    (pa.list_(pa.int32()), pa.large_list(pa.int64()), pa.large_list(pa.int64())),
    (pa.struct([("a", pa.int32())]), pa.struct([("b", pa.string()), ("a", pa.int64())]),
     pa.struct([("a", pa.int64()), ("b", pa.string())])),
    (pa.map_(pa.string(), pa.int8()), pa.map_(pa.string(), pa.int32()),
     pa.map_(pa.string(), pa.int32())),
]
CONFLICTS = [
    (pa.string(), pa.int64()), (pa.bool_(), pa.int8()), (pa.uint64(), pa.int64()),
    (pa.int64(), pa.float64()), (pa.timestamp("s"), pa.timestamp("ms")),
    (pa.decimal128(10, 2), pa.decimal128(10, 3)), (pa.list_(pa.string()), pa.list_(pa.int8())),
    (pa.struct([("a", pa.string())]), pa.struct([("a", pa.int8())])),
    (pa.string(), pa.struct([("a", pa.int8())])),
]


@pytest.mark.parametrize(("a", "b", "want"), LOSSLESS)
def test_types_join_where_arrow_converts_without_loss(a, b, want):
    assert promote(a, b) == want and promote(b, a) in (want, _swap_struct(want))


def _swap_struct(t):
    return pa.struct(list(t)[::-1]) if pa.types.is_struct(t) else t


@pytest.mark.parametrize(("a", "b"), CONFLICTS)
def test_types_without_a_lossless_common_type_conflict(a, b):
    assert promote(a, b) is None and promote(b, a) is None


# -- property: any per-file types conform to one schema, values unchanged or JSON text ------

SCALARS = {
    "int8": (pa.int8(), st.integers(-128, 127)),
    "int32": (pa.int32(), st.integers(-(2**31), 2**31 - 1)),
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint32": (pa.uint32(), st.integers(0, 2**32 - 1)),
    "float32": (pa.float32(), st.floats(width=32, allow_nan=False, allow_infinity=False)),
    "float64": (pa.float64(), st.floats(allow_nan=False, allow_infinity=False)),
    "string": (pa.string(), st.text(max_size=5)),
    "large_string": (pa.large_string(), st.text(max_size=5)),
    "bool": (pa.bool_(), st.booleans()),
    "null": (pa.null(), st.none()),
    "list_int32": (pa.list_(pa.int32()), st.lists(st.integers(-5, 5), max_size=3)),
    "struct_a": (pa.struct([("a", pa.int32())]), st.fixed_dictionaries({"a": st.integers(0, 9)})),
    "struct_ab": (pa.struct([("a", pa.int64()), ("b", pa.string())]),
                  st.fixed_dictionaries({"a": st.integers(0, 9), "b": st.text(max_size=3)})),
}


@st.composite
def per_file_columns(draw):
    """2-4 files, each holding column ``meta`` as one of SCALARS or lacking it."""
    files = []
    for _ in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from([*SCALARS, "missing"]))
        n = draw(st.integers(1, 4))
        if kind == "missing":
            files.append(("missing", None))
            continue
        t, values = SCALARS[kind]
        vals = draw(st.lists(st.none() | values, min_size=n, max_size=n))
        files.append((kind, pa.array(vals, t)))
    return files


def _plain(v):
    """Python value of an Arrow value, with the struct fields a join added (None) dropped."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@settings(derandomize=True, database=None, deadline=None, max_examples=100,
          suppress_health_check=list(HealthCheck))
@given(files=per_file_columns())
def test_any_per_file_types_conform_to_one_schema_without_loss(files):
    types = [(f"f{i}", None if col is None else col.type) for i, (_, col) in enumerate(files)]
    field, conflict = unify_column("meta", types)
    plan_schema = pa.schema([field])
    from gristmill.pipeline.carried_schema import CarriedPlan

    plan = CarriedPlan(schema=plan_schema, conflicts=[conflict] if conflict else [])
    out = []
    for i, (_, col) in enumerate(files):
        n = 2 if col is None else len(col)
        cols = {"text": pa.array(["t"] * n), ROW_KEY: pa.array(range(n), pa.uint64())}
        if col is not None:
            cols["meta"] = col
        table = conform(pa.table(cols), plan)
        assert table.schema.equals(pa.schema([("text", pa.string()), (ROW_KEY, pa.uint64()),
                                              field]), check_metadata=True), i
        got = table.column("meta").to_pylist()
        if col is None:
            assert got == [None] * n
        elif conflict is not None:
            assert field.metadata == JSON_TEXT
            assert got == json_text(col.to_pylist())[0]
        else:
            want = col.to_pylist()
            assert [_plain(g) for g in got] == [_plain(w) for w in want]
        out.append(table)
    pa.concat_tables(out).validate(full=True)  # one schema: the shards read as one table
    real = {str(c.type) for _, c in files if c is not None and not pa.types.is_null(c.type)}
    if conflict is None:
        assert all(promote(field.type, c.type) == field.type for _, c in files if c is not None)
    else:
        assert len(real) >= 2 and {t["type"] for t in conflict["types"]} >= real


# -- end to end ---------------------------------------------------------------------------

def _read_all(out: Path, manifest: dict) -> pa.Table:
    """Every shard together, the way a user reads an output folder."""
    paths = [str(out / s["path"]) for s in manifest["shards"]]
    table = ds.dataset(paths, format="parquet").to_table()
    import polars as pl

    assert pl.scan_parquet(paths).collect().height == table.num_rows
    assert [{"name": f.name, "type": str(f.type)} for f in table.schema] == \
        [{k: v for k, v in e.items() if k != "json_text"} for e in manifest["schema"]]
    for p in paths:
        assert pq.read_schema(p).equals(table.schema, check_metadata=True)
    return table


def _lossless_inputs(folder: Path) -> list[dict]:
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a0", "a1"], "meta": pa.array([1, None], pa.int32())}),
                   folder / "a.parquet")
    pq.write_table(pa.table({"text": ["b0"], "meta": pa.array([2**40], pa.int64()),
                             "tags": pa.array([{"k": 1}], pa.struct([("k", pa.int8())]))}),
                   folder / "b.parquet")
    pq.write_table(pa.table({"text": ["c0"], "meta": pa.nulls(1),
                             "tags": pa.array([{"j": "x"}], pa.struct([("j", pa.string())]))}),
                   folder / "c.parquet")
    return [{"path": str(folder / "*.parquet"), "columns": ["meta", "tags"]}]


def _conflict_inputs(folder: Path) -> list[dict]:
    folder.mkdir()
    pq.write_table(pa.table({"text": ["p0", "p1", "p2"],
                             "meta": pa.array([{"a": 1, "b": [1.5]}, None, {"a": 2, "b": []}],
                                              pa.struct([("a", pa.int64()),
                                                         ("b", pa.list_(pa.float64()))]))}),
                   folder / "p.parquet")
    pq.write_table(pa.table({"text": ["q0", "q1"], "meta": pa.array([0.5, math.nan])}),
                   folder / "q.parquet")
    (folder / "j.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "j1", "meta": "plain"}, {"text": "j2", "meta": 12},
        {"text": "j3", "meta": {"a": 1, "b": [1.5]}}, {"text": "j4", "url": "u"}]))
    return [{"path": str(folder / "*.parquet"), "columns": ["meta"]},
            {"path": str(folder / "j.jsonl"), "columns": ["meta", "url"]}]


def _run(sources: list[dict], out: Path, **engine) -> dict:
    body = {"name": "carried", "sources": sources, "stages": [{"stage": "text_stats"}],
            "output": {"path": str(out), "shard_size": "4KB"},
            "engine": {"batch_size": 2, **engine}}
    return run_recipe(parse_recipe(body), progress=False, report=False)


ENGINES = {"local": {"kind": "local"}, "dask": {"kind": "dask", "workers": 1},
           "beam": {"kind": "beam", "workers": 1}}


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_int_widths_null_columns_and_a_column_one_file_lacks_join_into_one_schema(
        tmp_path, engine):
    pytest.importorskip("dask.distributed")
    m = _run(_lossless_inputs(tmp_path / "in"), tmp_path / "out", **ENGINES[engine])
    assert m["schema_conflicts"] == [] and m["counts"]["rejected"] == 0
    table = _read_all(tmp_path / "out", m)
    assert table.schema.field("meta").type == pa.int64()
    assert table.schema.field("tags").type == pa.struct([("k", pa.int8()), ("j", pa.string())])
    got = {r["text"]: (r["meta"], r["tags"]) for r in table.to_pylist()}
    assert got == {"a0": (1, None), "a1": (None, None), "b0": (2**40, {"k": 1, "j": None}),
                   "c0": (None, {"k": None, "j": "x"})}


@pytest.mark.parametrize("engine", ["local", "dask", "beam"])
def test_a_conflicting_column_is_carried_as_json_text_and_reported(tmp_path, engine, capsys):
    if engine == "beam":
        pytest.importorskip("apache_beam")
    m = _run(_conflict_inputs(tmp_path / "in"), tmp_path / "out", **ENGINES[engine])
    table = _read_all(tmp_path / "out", m)
    assert table.schema.field("meta").type == pa.string()
    assert table.schema.field("meta").metadata == JSON_TEXT
    assert [e for e in m["schema"] if e["name"] == "meta"][0]["json_text"] is True
    assert table.schema.field("url").type == pa.string()  # only the JSONL source carries it
    (conflict,) = m["schema_conflicts"]
    assert conflict["column"] == "meta" and conflict["rule"] == "json_text"
    assert {t["type"]: t["files"] for t in conflict["types"]} == {
        "struct<a: int64, b: list<element: double>>": 1, "double": 1, "string": 1}
    assert "carried column 'meta'" in capsys.readouterr().err
    got = {r["text"]: r["meta"] for r in table.to_pylist()}
    # the JSONL rule, the same for a Parquet struct as for a JSON object
    assert got == {"p0": '{"a":1,"b":[1.5]}', "p1": None, "p2": '{"a":2,"b":[]}',
                   "q0": "0.5", "j1": "plain", "j2": "12", "j3": '{"a":1,"b":[1.5]}',
                   "j4": None}
    # NaN has no JSON text: that row is rejected with the column named, as in JSONL
    rejects = [json.loads(line) for f in m["rejects"]
               for line in (tmp_path / "out" / f).read_text().splitlines()]
    assert [(Path(r["source"]).name, r["line"]) for r in rejects] == [("q.parquet", 1)]
    assert "carried column 'meta'" in rejects[0]["reason"] and "NaN" in rejects[0]["reason"]
    assert m["counts"]["reconciled"] and m["counts"]["rejected"] == 1
    assert m["counts"]["read"] == 9
    from gristmill.cli.main import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "schema: carried column 'meta' has types" in capsys.readouterr().out


@settings(derandomize=True, database=None, deadline=None, max_examples=4,
          suppress_health_check=list(HealthCheck))
@given(files=per_file_columns())
def test_generated_per_file_types_give_one_readable_output(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("gen")
    folder = root / "in"
    folder.mkdir()
    for i, (_, col) in enumerate(files):
        n = 2 if col is None else len(col)
        cols = {"text": pa.array([f"{i}-{k}" for k in range(n)])}
        if col is not None:
            cols["meta"] = col
        pq.write_table(pa.table(cols), folder / f"f{i}.parquet")
    m = _run([{"path": str(folder / "*.parquet"), "columns": ["meta"]}], root / "out")
    table = _read_all(root / "out", m)
    assert m["counts"]["rejected"] == 0 and table.num_rows == m["counts"]["read"]
    got = {r["text"]: r["meta"] for r in table.to_pylist()}
    json_col = bool(m["schema_conflicts"])
    for i, (_, col) in enumerate(files):
        if col is None:
            continue
        want = json_text(col.to_pylist())[0] if json_col else col.to_pylist()
        have = [got[f"{i}-{k}"] for k in range(len(col))]
        assert [_plain(h) for h in have] == [_plain(w) for w in want], i
    assert np.all([e["name"] != "meta" or e.get("json_text", False) == json_col
                   for e in m["schema"]])


def test_a_row_rejected_while_conforming_is_not_counted_as_a_repeated_id(tmp_path):
    """The id ledger takes the rows the reader keeps after conforming: the NaN row
    (rejected, its id shared with a kept row) does not make that id repeated."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["p0", "p1"],
                             "meta": pa.array([{"a": 1}, {"a": 2}],
                                              pa.struct([("a", pa.int64())]))}),
                   folder / "p.parquet")
    pq.write_table(pa.table({"id": ["z", "x"], "text": ["q0", "q1"],
                             "meta": pa.array([0.5, math.nan])}), folder / "q.parquet")
    m = _run([{"path": str(folder / "*.parquet"), "columns": ["meta"]}], tmp_path / "out")
    assert m["counts"]["rejected"] == 1 and m["counts"]["reconciled"]
    assert m["ids"]["repeated_ids"] == 0 and m["ids"]["distinct_ids"] == 3
