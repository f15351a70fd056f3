"""One schema for a run's carried columns, whatever each input file holds.

A carried column (``columns:`` of a source) keeps the type its input gave it:
a Parquet column its Arrow type, a JSONL value its JSON text (a string, see
``readers``). Files disagree: ``meta`` is ``int32`` in one Parquet file and
``int64`` in the next, a ``struct`` here and a JSONL string there; one source
carries ``url`` and another does not. Shards written file by file would then
have different schemas, and a reader of the whole output (``pyarrow.dataset``,
``polars.scan_parquet``, Hugging Face ``datasets``) fails. So before any data is
read the driver reads every Parquet footer and plans one type per carried
column, and every reader batch is conformed to it (``conform``); every shard
of a run has the same schema, which is the manifest's ``schema``.

The rule (``promote``): a column gets the narrowest type every file's type
converts to *without loss*, as Arrow's casts do it:

- a column a file lacks, or holds as Arrow ``null``, is null in that file's rows;
- integers widen (``int32`` + ``int64`` -> ``int64``; ``uint32`` + ``int32`` ->
  ``int64``; ``uint64`` + a signed type has no lossless common type);
- floats widen; integers of up to 16 bits join ``float32``, of up to 32 bits
  ``float64``; a 64-bit integer and a float have no lossless common type;
- ``string`` / ``large_string`` / ``string_view`` -> ``string`` (``large_string``
  if any file has it); the same for binary; a dictionary joins as its values;
- lists join as lists of the joined item type (``large_list`` if any file has
  one; fixed-size lists of one size stay fixed); structs join field by field
  by name (a field a file lacks is null there); maps join key and item types;
- any other pair (``bool`` + ``int``, ``string`` + ``int``, two timestamps of
  different units or zones, two decimals of different scale) *conflicts*.

A conflicting column is never cast with loss and never rejected: it is carried
as **JSON text** in every file, by the rule JSONL already uses for carried
values: a string as it is, any other value as its compact JSON text
(``json.dumps(v, ensure_ascii=False, separators=(",", ":"),
allow_nan=False)``; a struct is an object, a list an array, a map an array of
``[key, value]`` pairs, dates and times ISO 8601 strings, decimals strings,
bytes base64 strings). The schema field carries the metadata
``{"gristmill": "json_text"}``, the manifest lists the conflict under
``schema_conflicts`` (column, each type with how many files hold it and the
first of them) and the run prints one line per conflicting column. A value
JSON text cannot hold (``NaN``, an infinity) rejects that row with a reason
naming the column, as it would in a JSONL file. A column no file gives a
type (absent or Arrow ``null`` everywhere) is ``string``, as from JSONL.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.pipeline import storage
from gristmill.pipeline.stage import KEY_POS_MASK, ROW_KEY

JSON_TEXT = {b"gristmill": b"json_text"}
PLAN_FILE = "carried_schema.json"
MAX_FILES_NAMED = 5
FOOTER_THREADS = 16
_CANONICAL = frozenset({"id", "text", "domain", "source", ROW_KEY, "prompt", "responses",
                        "response_sources"})


# -- the rule ------------------------------------------------------------------------------

def _unwrap(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _string_kind(t: pa.DataType) -> str | None:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    return None


def _is_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))


def _is_large_list(t: pa.DataType) -> bool:
    return pa.types.is_large_list(t) or pa.types.is_large_list_view(t)


def _promote_int(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    sa, sb = pa.types.is_signed_integer(a), pa.types.is_signed_integer(b)
    if sa == sb:
        return a if a.bit_width >= b.bit_width else b
    signed, unsigned = (a, b) if sa else (b, a)
    if unsigned.bit_width < signed.bit_width:
        return signed
    if unsigned.bit_width < 64:
        return pa.int64() if unsigned.bit_width == 32 else {8: pa.int16(), 16: pa.int32()}[
            unsigned.bit_width]
    return None


def _promote_float(f: pa.DataType, i: pa.DataType) -> pa.DataType | None:
    """A float type that holds every value of float ``f`` and integer ``i`` exactly."""
    if i.bit_width <= 16 and f.bit_width <= 32:
        return pa.float32()
    if i.bit_width <= 32:
        return pa.float64()
    return None


def promote(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The narrowest type both ``a`` and ``b`` convert to without loss, or None.

    >>> promote(pa.int32(), pa.int64())
    DataType(int64)
    >>> promote(pa.string(), pa.int64()) is None
    True
    """
    a, b = _unwrap(a), _unwrap(b)
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return _promote_int(a, b)
    if pa.types.is_floating(a) and pa.types.is_floating(b):
        return a if a.bit_width >= b.bit_width else b
    if pa.types.is_floating(a) and pa.types.is_integer(b):
        return _promote_float(a, b)
    if pa.types.is_integer(a) and pa.types.is_floating(b):
        return _promote_float(b, a)
    ka, kb = _string_kind(a), _string_kind(b)
    if ka is not None and ka == kb:
        large = pa.types.is_large_string(a) or pa.types.is_large_string(b) or \
            pa.types.is_large_binary(a) or pa.types.is_large_binary(b)
        if ka == "string":
            return pa.large_string() if large else pa.string()
        return pa.large_binary() if large else pa.binary()
    if _is_list(a) and _is_list(b):
        item = promote(a.value_type, b.value_type)
        if item is None:
            return None
        name = a.value_field.name
        if (pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b)
                and a.list_size == b.list_size):
            return pa.list_(pa.field(name, item), a.list_size)
        if _is_large_list(a) or _is_large_list(b):
            return pa.large_list(pa.field(name, item))
        return pa.list_(pa.field(name, item))
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields: dict[str, pa.DataType] = {}
        for f in list(a) + list(b):
            if f.name in fields:
                joined = promote(fields[f.name], f.type)
                if joined is None:
                    return None
                fields[f.name] = joined
            else:
                fields[f.name] = f.type
        if len({f.name for f in a}) != a.num_fields or len({f.name for f in b}) != b.num_fields:
            return None  # repeated field names cannot be joined by name
        return pa.struct([pa.field(n, t) for n, t in fields.items()])
    if pa.types.is_map(a) and pa.types.is_map(b):
        key, item = promote(a.key_type, b.key_type), promote(a.item_type, b.item_type)
        if key is None or item is None or pa.types.is_null(key):
            return None
        return pa.map_(key, item)
    return None


# -- the plan ------------------------------------------------------------------------------

@dataclass
class CarriedPlan:
    """The run's carried columns: their types, and the ones carried as JSON text."""

    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def json_text(self) -> set[str]:
        return {f.name for f in self.schema if f.metadata == JSON_TEXT}

    def to_json(self) -> dict[str, Any]:
        body = self.schema.serialize().to_pybytes()
        return {"schema": base64.b64encode(body).decode(), "conflicts": self.conflicts}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CarriedPlan:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["schema"])))
        return cls(schema=schema, conflicts=d["conflicts"])


def unify_column(name: str, types: Iterable[tuple[str, pa.DataType | None]]
                 ) -> tuple[pa.Field, dict[str, Any] | None]:
    """The run-level field of carried column ``name`` from (file label, its type or
    None when the file lacks the column) pairs, in task order; and the conflict
    (column, types with their file counts and first files) when there is one."""
    joined: pa.DataType | None = pa.null()
    seen: dict[str, list[str]] = {}
    distinct: dict[str, pa.DataType] = {}
    for label, t in types:
        if t is None:
            continue
        seen.setdefault(str(_unwrap(t)), []).append(label)
        distinct.setdefault(str(t), t)
        if joined is not None:
            joined = promote(joined, t)
    if joined is not None and not all(_castable(t, joined) for t in distinct.values()):
        joined = None  # lossless in principle, but this Arrow has no cast for it
    if joined is None:
        conflict = {"column": name, "rule": "json_text", "types": [
            {"type": t, "files": len(files), "first_files": files[:MAX_FILES_NAMED]}
            for t, files in seen.items()]}
        return pa.field(name, pa.string(), metadata=JSON_TEXT), conflict
    if pa.types.is_null(joined):
        joined = pa.string()
    return pa.field(name, joined), None


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    try:
        pa.array([], source).cast(target)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _parquet_types(path: str) -> dict[str, pa.DataType] | None:
    try:
        if storage.is_remote(path):
            with storage.open_read(path) as f:
                schema = pq.read_schema(f)
        else:
            schema = pq.read_schema(path)
    except (pa.ArrowException, OSError):
        return None  # the reader reports the file (unreadable, corrupt)
    return {f.name: f.type for f in schema}


def plan_carried(recipe: Any, tasks: list[Any]) -> CarriedPlan:
    """Read every Parquet footer of a source that carries columns and plan one
    field per carried column (see the module docstring)."""
    names: list[str] = []
    for src in recipe.sources:
        names += [c for c in src.columns if c not in names and c not in _CANONICAL]
    if not names:
        return CarriedPlan()
    per_column: dict[str, list[tuple[str, pa.DataType | None]]] = {n: [] for n in names}
    files: dict[str, Any] = {}  # path -> its first task (a split file has several)
    for task in tasks:
        if recipe.sources[task.source_index].columns:
            files.setdefault(task.path, task)
    parquet = [p for p, t in files.items() if t.format == "parquet"]
    # footers are small reads; on an object store their latency dominates: read in parallel
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        footers = dict(zip(parquet, pool.map(_parquet_types, parquet), strict=True))
    for path, task in files.items():
        carried = recipe.sources[task.source_index].columns
        file_types = footers[path] if task.format == "parquet" else {
            c: pa.string() for c in carried}
        if file_types is None:
            continue
        for c in carried:
            if c in per_column:
                per_column[c].append((task.file_label, file_types.get(c)))
    fields, conflicts = [], []
    for n in names:
        f, conflict = unify_column(n, per_column[n])
        fields.append(f)
        if conflict is not None:
            conflicts.append(conflict)
    return CarriedPlan(schema=pa.schema(fields), conflicts=conflicts)


def describe_conflict(conflict: dict[str, Any]) -> str:
    kinds = "; ".join(f"{t['type']} in {t['files']} file(s), first {t['first_files'][0]}"
                      for t in conflict["types"])
    return (f"carried column {conflict['column']!r} has types that no type holds without "
            f"loss ({kinds}); it is carried as JSON text in every file")


def prepare(recipe: Any, tasks: list[Any], work: Path) -> CarriedPlan:
    """Plan once per run (a resume reuses ``_work/carried_schema.json``) and say
    which columns conflict."""
    path = work / PLAN_FILE
    if storage.exists(path):
        with storage.open_read(path) as f:
            return CarriedPlan.from_json(json.load(f))
    plan = plan_carried(recipe, tasks)
    for conflict in plan.conflicts:
        print(f"gristmill: {describe_conflict(conflict)}", file=sys.stderr)
    storage.write_bytes(path, json.dumps(plan.to_json()).encode())
    return plan


_PLANS: dict[str, CarriedPlan] = {}


def load_plan(work: Path) -> CarriedPlan | None:
    """The run's plan (cached per process by path and mtime); None when absent."""
    path = work / PLAN_FILE
    if not storage.exists(path):
        return None
    key = f"{path}:{storage.stat(path)['mtime_ns']}"
    if key not in _PLANS:
        with storage.open_read(path) as f:
            _PLANS[key] = CarriedPlan.from_json(json.load(f))
    return _PLANS[key]


# -- conforming batches --------------------------------------------------------------------

def _jsonable(o: Any) -> Any:
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if isinstance(o, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(o)).decode()
    return str(o)  # Decimal, timedelta, anything else Arrow gives


def json_text(values: list[Any]) -> tuple[list[str | None], dict[int, str]]:
    """Values as JSON text (strings as they are), and the rows JSON cannot hold."""
    out: list[str | None] = []
    bad: dict[int, str] = {}
    for i, v in enumerate(values):
        if v is None or isinstance(v, str):
            out.append(v)
            continue
        try:
            out.append(json.dumps(v, ensure_ascii=False, separators=(",", ":"),
                                  allow_nan=False, default=_jsonable))
        except ValueError:
            bad[i] = "holds NaN or an infinite number, which JSON text cannot represent"
            out.append(None)
        except RecursionError:
            bad[i] = "nests too deeply to be written as JSON text"
            out.append(None)
    return out, bad


def conform(table: pa.Table, plan: CarriedPlan, report: Any = None) -> pa.Table:
    """``table`` with every carried column of ``plan``, in the plan's order and type.

    Rows with a value JSON text cannot hold (in a JSON-text column) are removed
    and rejected on ``report`` (a ``readers.FileReport``) with their line or row.
    """
    if not len(plan.schema):
        return table
    n = table.num_rows
    carried = set(plan.schema.names)
    cols = {c: table.column(c) for c in table.column_names if c not in carried}
    reasons: dict[int, str] = {}
    for f in plan.schema:
        if f.name not in table.column_names:
            cols[f.name] = pa.nulls(n, f.type)
            continue
        col = table.column(f.name)
        if col.null_count == n:  # a reader's nulls for a column its file lacks
            col = pa.nulls(n, f.type)
        elif f.metadata == JSON_TEXT and _string_kind(_unwrap(col.type)) != "string":
            text, bad = json_text(col.to_pylist())
            for i, why in bad.items():
                reasons.setdefault(i, f"carried column {f.name!r} {why} (the column is JSON "
                                      "text: its types differ between input files)")
            col = pa.array(text, pa.string())
        elif col.type != f.type:
            col = col.cast(f.type)  # lossless by construction of the plan (``promote``)
        cols[f.name] = col
    out = pa.Table.from_arrays(list(cols.values()), schema=pa.schema(
        [table.schema.field(c) for c in cols if c not in carried] + list(plan.schema)))
    if reasons:
        keep = np.ones(n, dtype=bool)
        keep[list(reasons)] = False
        if report is not None:
            keys = table.column(ROW_KEY).to_pylist() if ROW_KEY in table.column_names else None
            report.records -= len(reasons)  # counted as read when the reader yielded them
            for i in sorted(reasons):
                report.reject(reasons[i], keys[i] & KEY_POS_MASK if keys else i, None)
        out = out.filter(pa.array(keep))
    return out


def unified_schema(schemas: list[pa.Schema]) -> pa.Schema | None:
    """One schema every shard's converts to without loss (columns by name, in
    first-seen order), or None when two shards' columns conflict."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in fields:
                fields[f.name] = f
                continue
            t = promote(fields[f.name].type, f.type)
            if t is None:
                return None
            fields[f.name] = fields[f.name].with_type(t)
    return pa.schema(list(fields.values()))


def manifest_schema(out: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's ``schema``: every Parquet shard's schema joined (they are
    equal when every batch was conformed; a stage that gives a column different
    types in different tasks is joined by ``promote`` where it can be), as
    ``{"name", "type"}`` entries, ``"json_text": true`` on JSON-text columns."""
    schemas = []
    for sh in shards:
        with storage.open_read(out / sh["path"]) as fh:
            schemas.append(pq.read_schema(fh))
    if not schemas:
        return []
    joined = unified_schema(schemas) or schemas[0]
    return [{"name": f.name, "type": str(f.type), **({"json_text": True}
                                                      if f.metadata == JSON_TEXT else {})}
            for f in joined]
