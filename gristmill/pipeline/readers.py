"""Readers: JSONL (plain, .gz, .zst) and Parquet, streamed as Arrow tables.

Memory is bounded by the block and batch size, never by the file. A bad
record never stops a run: it is returned as a reject with the file, the line
(JSONL, 1-based) or row (Parquet, 0-based) and the reason. A file that ends
early (a truncated .gz or .zst) keeps what was read before the fault and is
reported with status ``truncated``.

Row identity: every record gets the pipeline's row key (``stage.ROW_KEY``, a
uint64 of the input file's index and the line or row number), unique by
construction. The user's id is data: the mapped id field when the source has
one, else ``<file>:<line>`` (``<file>:<row>`` for Parquet), where ``<file>``
is the input file's path relative to the recipe folder, so derived ids never
collide between files of one source.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import zstandard

from gristmill.pipeline.recipe import SourceSpec
from gristmill.pipeline.stage import KEY_POS_BITS, ROW_KEY, make_keys

BLOCK_BYTES = 8 << 20
READ_CHUNK = 256 << 10
MAX_RAW_CHARS = 100_000  # a reject keeps at most this much of the raw line


def pretrain_schema(extra: list[str] | None = None) -> pa.Schema:
    fields = [("id", pa.string()), ("text", pa.string()), ("domain", pa.string()),
              ("source", pa.string()), (ROW_KEY, pa.uint64())]
    return pa.schema(fields + [(c, pa.string()) for c in extra or []])


def sft_schema(extra: list[str] | None = None) -> pa.Schema:
    fields = [("id", pa.string()), ("prompt", pa.string()), ("responses", pa.list_(pa.string())),
              ("response_sources", pa.list_(pa.string())), ("domain", pa.string()),
              ("source", pa.string()), (ROW_KEY, pa.uint64())]
    return pa.schema(fields + [(c, pa.string()) for c in extra or []])


@dataclass
class InputTask:
    """One unit of input work: a file of a source. Engines distribute these."""

    index: int
    source_index: int
    path: str
    format: str
    label: str  # the `source` column: the source's name, else the file's path
    size: int = 0
    file_label: str = ""  # the file's path relative to the recipe folder; derived ids

    def __post_init__(self) -> None:
        if not self.file_label:
            self.file_label = self.label


@dataclass
class FileReport:
    """What happened to one input file; goes into the manifest."""

    path: str
    status: str = "ok"  # ok | empty | truncated | unreadable
    records: int = 0  # records read (good + rejected)
    rejected: int = 0
    bytes: int = 0
    error: str | None = None
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, reason: str, line: int | None = None, raw: str | None = None) -> None:
        self.rejects.append({"source": self.path, "line": line, "reason": reason,
                             "raw": None if raw is None else raw[:MAX_RAW_CHARS]})
        if line is not None:
            self.rejected += 1
            self.records += 1

    def file_error(self, status: str, error: str) -> None:
        self.status = status
        self.error = error
        self.rejects.append({"source": self.path, "line": None, "reason": f"{status}: {error}",
                             "raw": None})


class _Normalizer:
    """Turns raw parsed fields into the canonical schema for one source."""

    def __init__(self, spec: SourceSpec, task: InputTask) -> None:
        self.spec = spec
        self.task = task
        self.kind = spec.kind
        self.schema = (pretrain_schema if spec.kind == "pretrain" else sft_schema)(spec.columns)
        f = spec.fields
        self.main = [f.text] if spec.kind == "pretrain" else [f.prompt, f.responses]

    def record(self, obj: Any, line: int, report: FileReport, raw: str) -> dict | None:
        f = self.spec.fields
        if not isinstance(obj, dict):
            report.reject(f"not a JSON object ({type(obj).__name__})", line, raw)
            return None
        out: dict[str, Any] = {}
        if self.kind == "pretrain":
            text = obj.get(f.text)
            if text is None:
                report.reject(f"missing field {f.text!r}", line, raw)
                return None
            if not isinstance(text, str):
                report.reject(f"field {f.text!r} is {type(text).__name__}, not a string", line, raw)
                return None
            out["text"] = text
        else:
            prompt, responses = obj.get(f.prompt), obj.get(f.responses)
            if not isinstance(prompt, str):
                report.reject(f"field {f.prompt!r} missing or not a string", line, raw)
                return None
            if not (isinstance(responses, list) and responses
                    and all(isinstance(r, str) for r in responses)):
                report.reject(f"field {f.responses!r} must be a non-empty list of strings",
                              line, raw)
                return None
            out["prompt"], out["responses"] = prompt, responses
            srcs = obj.get(f.response_sources) if f.response_sources else None
            out["response_sources"] = ([str(s) for s in srcs] if isinstance(srcs, list)
                                       and len(srcs) == len(responses) else None)
        rid = obj.get(f.id) if f.id else None
        out["id"] = str(rid) if rid is not None else f"{self.task.file_label}:{line}"
        dom = obj.get(f.domain) if f.domain else None
        out["domain"] = self.spec.domain or (str(dom) if dom is not None else None)
        out["source"] = self.task.label
        out[ROW_KEY] = (self.task.index << KEY_POS_BITS) | line
        for c in self.spec.columns:
            v = obj.get(c)
            out[c] = None if v is None else (v if isinstance(v, str) else json.dumps(v))
        return out

    def finish_fast(self, table: pa.Table, first_line: int) -> pa.Table:
        """Canonicalize a table parsed by pyarrow's JSON reader (fast path)."""
        f = self.spec.fields
        n = table.num_rows
        cols: dict[str, pa.Array] = {}
        if f.id and f.id in table.column_names:
            ids = table.column(f.id)
        else:
            ids = None
        if ids is None or ids.null_count:
            derived = pa.array([f"{self.task.file_label}:{first_line + i}" for i in range(n)])
            ids = derived if ids is None else pa.compute.coalesce(ids, derived)
        cols["id"] = ids
        if self.kind == "pretrain":
            cols["text"] = table.column(f.text)
        else:
            cols["prompt"] = table.column(f.prompt)
            cols["responses"] = table.column(f.responses)
            if f.response_sources and f.response_sources in table.column_names:
                cols["response_sources"] = table.column(f.response_sources)
            else:
                cols["response_sources"] = pa.nulls(n, pa.list_(pa.string()))
        if self.spec.domain is not None:
            cols["domain"] = pa.array([self.spec.domain] * n, pa.string())
        elif f.domain and f.domain in table.column_names:
            cols["domain"] = table.column(f.domain)
        else:
            cols["domain"] = pa.nulls(n, pa.string())
        cols["source"] = pa.array([self.task.label] * n, pa.string())
        cols[ROW_KEY] = make_keys(self.task.index, np.arange(first_line, first_line + n))
        for c in self.spec.columns:
            cols[c] = table.column(c) if c in table.column_names else pa.nulls(n, pa.string())
        # from_arrays, not pa.table(): the latter probes for pandas and imports it
        return pa.Table.from_arrays([cols[name] for name in self.schema.names],
                                    schema=self.schema)

    def parse_schema(self) -> pa.Schema:
        """Explicit schema for pyarrow's JSON reader: the fields we need, typed."""
        f = self.spec.fields
        fields = []
        if f.id:
            fields.append((f.id, pa.string()))
        if self.kind == "pretrain":
            fields.append((f.text, pa.string()))
        else:
            fields += [(f.prompt, pa.string()), (f.responses, pa.list_(pa.string()))]
            if f.response_sources:
                fields.append((f.response_sources, pa.list_(pa.string())))
        if f.domain and self.spec.domain is None:
            fields.append((f.domain, pa.string()))
        fields += [(c, pa.string()) for c in self.spec.columns]
        seen, uniq = set(), []
        for name, t in fields:
            if name not in seen:
                seen.add(name)
                uniq.append((name, t))
        return pa.schema(uniq)


class _ZstdStream(io.RawIOBase):
    """Multi-frame zstd decompression that notices a truncated last frame.

    ``ZstdDecompressor().stream_reader`` returns EOF quietly when the input
    ends inside a frame; a truncated file must be reported, so we drive a
    ``decompressobj`` per frame and check that the last one reached its end.
    """

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while len(out) < max(n, 1):
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                break
            while chunk:
                self._in_frame = True
                out += self._obj.decompress(chunk)
                if self._obj.eof:
                    self._in_frame = False
                    chunk = self._obj.unused_data
                    self._obj = self._dctx.decompressobj()
                else:
                    chunk = b""
        return bytes(out)

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_binary(path: str) -> io.IOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return _ZstdStream(path)
    return open(path, "rb")


def _read_blocks(stream: io.IOBase, report: FileReport) -> Iterator[tuple[bytes, bool]]:
    """Yield (block of whole lines, is_last). Reads in small chunks so that a
    decompression fault loses only the chunk it happened in: every whole line
    before it is yielded, the incomplete tail last, and the file is marked
    ``truncated``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = stream.read(READ_CHUNK)
        except (EOFError, OSError, zstandard.ZstdError) as e:
            report.file_error("truncated", f"{type(e).__name__}: {e}")
            data = b"".join(chunks)
            cut = data.rfind(b"\n")
            if cut >= 0:
                yield data[: cut + 1], False
            if len(data) > cut + 1:
                yield data[cut + 1:], True
            return
        if not chunk:
            if chunks:
                yield b"".join(chunks), True
            return
        report.bytes += len(chunk)
        chunks.append(chunk)
        size += len(chunk)
        if size >= BLOCK_BYTES and b"\n" in chunk:
            cut = chunk.rfind(b"\n")
            head, tail = chunk[: cut + 1], chunk[cut + 1:]
            chunks[-1] = head
            yield b"".join(chunks), False
            chunks, size = ([tail], len(tail)) if tail else ([], 0)


def read_jsonl(task: InputTask, spec: SourceSpec, report: FileReport,
               batch_size: int) -> Iterator[pa.Table]:
    norm = _Normalizer(spec, task)
    parse_opts = pajson.ParseOptions(explicit_schema=norm.parse_schema(),
                                     unexpected_field_behavior="ignore")
    line_no = 0
    try:
        stream = _open_binary(task.path)
    except OSError as e:
        report.file_error("unreadable", f"{type(e).__name__}: {e}")
        return
    with stream:
        for block, _last in _read_blocks(stream, report):
            n_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            table = None
            if report.status != "truncated":
                try:
                    table = pajson.read_json(
                        pa.BufferReader(block), parse_options=parse_opts,
                        read_options=pajson.ReadOptions(block_size=max(len(block), 1 << 20)))
                except (pa.ArrowInvalid, UnicodeDecodeError, ValueError):
                    table = None
                if table is not None and table.num_rows != n_lines:
                    table = None  # blank lines: fall back so line numbers stay exact
                if table is not None and _has_missing_main(table, norm):
                    table = None
            if table is not None:
                report.records += table.num_rows
                out = norm.finish_fast(table, line_no + 1)
                line_no += n_lines
                for start in range(0, out.num_rows, batch_size):
                    yield out.slice(start, batch_size)
                continue
            rows = []
            for raw_line in block.split(b"\n")[:n_lines]:
                line_no += 1
                if not raw_line.strip():
                    continue
                try:
                    text = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    report.reject(f"invalid UTF-8: {e.reason} at byte {e.start}", line_no,
                                  raw_line.decode("utf-8", "backslashreplace"))
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    reason = f"malformed JSON: {e.msg} at column {e.colno}"
                    if report.status == "truncated" and _last:
                        reason = "incomplete last line of a truncated file"
                    report.reject(reason, line_no, text)
                    continue
                rec = norm.record(obj, line_no, report, text)
                if rec is not None:
                    report.records += 1
                    rows.append(rec)
                if len(rows) >= batch_size:
                    yield pa.Table.from_pylist(rows, schema=norm.schema)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=norm.schema)
    if report.records == 0 and report.status == "ok":
        report.file_error("empty", "no records in file")


def _has_missing_main(table: pa.Table, norm: _Normalizer) -> bool:
    """Rows the fast path cannot judge: null main fields or empty response lists."""
    if any(table.column(c).null_count for c in norm.main if c in table.column_names):
        return True
    if norm.kind == "sft" and table.num_rows:
        lengths = pa.compute.list_value_length(table.column(norm.spec.fields.responses))
        return pa.compute.min(lengths).as_py() == 0
    return False


def read_parquet(task: InputTask, spec: SourceSpec, report: FileReport,
                 batch_size: int) -> Iterator[pa.Table]:
    norm = _Normalizer(spec, task)
    try:
        pf = pq.ParquetFile(task.path)
    except (pa.ArrowException, OSError) as e:
        report.file_error("unreadable", f"{type(e).__name__}: {e}")
        return
    want = norm.parse_schema()
    missing = [c for c in norm.main if c not in pf.schema_arrow.names]
    if missing:
        report.file_error("unreadable", f"missing column(s) {missing}; has {pf.schema_arrow.names}")
        return
    columns = [c for c in want.names if c in pf.schema_arrow.names]
    row0 = 0
    try:
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
            table = pa.Table.from_batches([rb])
            report.bytes += table.nbytes
            table = table.cast(pa.schema([want.field(c) for c in table.column_names]))
            n = table.num_rows
            bad = None
            for c in norm.main:
                if table.column(c).null_count:
                    m = table.column(c).is_null()
                    bad = m if bad is None else pa.compute.or_(bad, m)
            if bad is not None:
                bad_idx = [i for i, b in enumerate(bad.to_pylist()) if b]
                for i in bad_idx:
                    report.reject(f"null {norm.main}", row0 + i, None)
                table = table.filter(pa.compute.invert(bad))
            else:
                bad_idx = []
            good_rows = [i for i in range(n) if i not in set(bad_idx)] if bad_idx else None
            report.records += table.num_rows
            out = norm.finish_fast(table, row0)
            if good_rows is not None:
                # row keys and derived ids must keep the original row numbers
                out = out.set_column(out.schema.get_field_index(ROW_KEY), ROW_KEY,
                                     make_keys(task.index, np.asarray(good_rows) + row0))
                if not (spec.fields.id and spec.fields.id in columns):
                    out = out.set_column(0, "id", pa.array(
                        [f"{task.file_label}:{row0 + i}" for i in good_rows], pa.string()))
            row0 += n
            yield out
    except (pa.ArrowException, OSError) as e:
        report.file_error("truncated", f"{type(e).__name__}: {e}")
    if report.records == 0 and report.status == "ok":
        report.file_error("empty", "no rows in file")


def read_task(task: InputTask, spec: SourceSpec, report: FileReport,
              batch_size: int) -> Iterator[pa.Table]:
    """Stream one input file as canonical Arrow tables of at most ``batch_size`` rows."""
    reader = read_jsonl if task.format == "jsonl" else read_parquet
    for table in reader(task, spec, report, batch_size):
        if table.num_rows:
            yield table
