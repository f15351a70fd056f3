"""Readers: JSONL (plain, .gz, .zst) and Parquet, streamed as Arrow tables.

Memory is bounded by the block and batch size, never by the file. A bad
record never stops a run: it is returned as a reject with the file, the line
(JSONL, 1-based) or row (Parquet, 0-based) and the reason. Nothing is cast to
fit, and every table a reader yields passes ``pyarrow``'s full validation.
An input is a local path or an object-store URL (``s3://...``, read through
``storage.open_read``: ranged reads, no local copy).

JSONL, strictly
    A line is a record when it is valid UTF-8 and valid JSON (RFC 8259, plus
    the ``NaN``/``Infinity`` literals both parsers accept outside the fields we
    read) whose top-level value is an object holding the main fields (``text``;
    or ``prompt`` and a non-empty list of strings ``responses``) as strings.
    Otherwise it is rejected with its reason: invalid UTF-8 (anywhere in the
    line), malformed JSON, a lone surrogate escape (``"\\ud800"``, anywhere in
    the line), a field read twice (``{"text": .., "text": ..}``), a missing or
    non-string main field, ``response_sources`` not a list of strings as long
    as ``responses``. Lines holding only spaces, tabs or ``\\r`` are not
    records. A UTF-8 byte order mark at the very start of a file is skipped.

    Two paths read a block of lines and they agree on every line: the fast
    path (``pyarrow.json``, parsing 1 MiB chunks in parallel) takes a block
    only when its bytes are valid UTF-8, no line is a bare ``null`` (pyarrow
    25 crashes with SIGSEGV on a parse chunk that starts with one) and every
    non-blank line parsed to exactly one row with the main fields present;
    any other block goes line by line through the careful path (``json``).
    A line Python's ``json`` cannot read for its own limits (nesting depth,
    integer digits) is judged by ``pyarrow.json`` on that one line, which has
    neither, so a record is kept or rejected whatever its neighbours are.

Carried columns (``columns:``)
    From Parquet a carried column keeps its Arrow type (struct, list, map,
    anything), values unchanged. From JSONL a carried column is a string: a
    JSON string value is carried as it is; any other JSON value as its
    compact JSON text, ``json.dumps(v, ensure_ascii=False,
    separators=(",", ":"), allow_nan=False)`` (so ``{"a": [1, 2]}`` becomes
    ``'{"a":[1,2]}'``; numbers are written as Python's ``json`` writes them,
    ``1.50`` as ``1.5``); ``null`` or a missing field is null; a value holding
    ``NaN`` or an infinite number is rejected. The user's ``id`` and the
    ``domain`` follow the same rule from JSONL. Files of a run can give one
    carried column different types: the engines conform every batch to one
    type per column, planned from every input before reading (lossless
    promotion, else JSON text; ``carried_schema``).

Parquet, strictly
    ``text`` and ``prompt`` must be string columns (``string``,
    ``large_string``, ``string_view`` or a dictionary of strings), and
    ``responses``/``response_sources`` lists of strings; ``id`` and ``domain``
    strings or integers (integers are written in decimal, as JSONL writes
    them). A column of any other type rejects the whole file: every row is
    counted as read and rejected, with one reject line naming the column, its
    type and the row count. Null main fields, empty response lists and
    invalid UTF-8 in any column read are rejected per row.

Compressed and damaged files
    ``.gz`` (multi-member) and ``.zst`` (multi-frame) are decompressed from
    small compressed reads, so a file that ends early (status ``truncated``)
    keeps every line that the decompressor could recover before the end, down
    to the last complete line; the incomplete last line is a reject. Corrupt
    compressed data (status ``corrupt``) keeps what was decoded before the
    fault (for gzip exactly up to the bad byte; for zstd up to the last 64 KiB
    of compressed input before it). A Parquet file that fails mid-read keeps
    the batches before the fault (status ``corrupt``, the error says after
    which row). The manifest's file entry carries status and error. A big
    ``.zst`` file of several frames may be read by several tasks, each decoding
    from a frame boundary (``splits``); a damaged one is never split.

Row identity: every record gets the pipeline's row key (``stage.ROW_KEY``, a
uint64 of the input file's index and the line or row number), unique by
construction; a rejected line's key is never given to another record, and kept
records keep their own line or row number. The user's id is data: the mapped
id field when the source has one, else ``<file>:<line>`` (``<file>:<row>`` for
Parquet), where ``<file>`` is the input file's path relative to the recipe
folder, so derived ids never collide between files of one source.
"""

from __future__ import annotations

import errno
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from gristmill.pipeline import storage
from gristmill.pipeline.decompress import FrameRange, StreamFault, open_binary, open_range
from gristmill.pipeline.recipe import SourceSpec
from gristmill.pipeline.rejects import BATCH_CHARS as REJECT_BATCH_CHARS
from gristmill.pipeline.rejects import BATCH_ROWS as REJECT_BATCH_ROWS
from gristmill.pipeline.rejects import RejectsWriter
from gristmill.pipeline.stage import KEY_POS_BITS, ROW_KEY, make_keys

BLOCK_BYTES = 8 << 20
READ_CHUNK = 256 << 10  # decompressed bytes asked of a stream per read
PARSE_CHUNK = 1 << 20  # pyarrow.json parses a block in chunks of this size, in parallel
MAX_RAW_CHARS = 100_000  # a reject keeps at most this much of the raw line
BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_HEAD = re.compile(rb"[ \t\r]*(\n|null|$)")  # a first line that is blank or a bare null


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
    """One unit of input work: a file of a source, or a piece of a big one
    (``splits``: a JSONL byte range of whole lines, of the file or of a zstd file's
    decompressed bytes starting in a frame of its own; a run of Parquet row groups).
    Engines distribute these; ``index`` orders them (output names), ``file_index``
    names the file in row keys, so a piece's keys are the unsplit file's keys."""

    index: int
    source_index: int
    path: str
    format: str
    label: str  # the `source` column: the source's name, else the file's path
    size: int = 0
    file_label: str = ""  # the file's path relative to the recipe folder; derived ids
    file_index: int = -1  # the input file's index (row keys); -1: the same as ``index``
    part: int = 0  # which piece of the file this task reads, of ``parts``
    parts: int = 1
    start: int = 0  # JSONL piece: bytes [start, end) of whole lines, the first one
    end: int = -1  # numbered ``first_line``; end -1: the whole file
    first_line: int = 1
    #: zstd piece: ``start``/``end`` count decompressed bytes; decoding starts at the
    #: frame at compressed byte ``frame_offset``, whose output starts at ``frame_base``
    frame_offset: int = -1
    frame_base: int = 0
    row_groups: list[int] | None = None  # Parquet piece: its row groups, the first
    first_row: int = 0  # one starting at row ``first_row`` of the file
    #: the file as the split plan saw it: size, mtime_ns, xxh3_128, and the piece's
    #: ``range_xxh3_64`` (JSONL); a task refuses a file that no longer matches
    planned: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.file_label:
            self.file_label = self.label
        if self.file_index < 0:
            self.file_index = self.index

    @property
    def is_piece(self) -> bool:
        """True for a task that reads part of a split file."""
        return self.parts > 1


@dataclass
class FileReport:
    """What happened to one input file; goes into the manifest."""

    path: str
    status: str = "ok"  # ok | empty | truncated | corrupt | unreadable | rejected
    records: int = 0  # records read (good + rejected)
    rejected: int = 0
    bytes: int = 0
    error: str | None = None
    #: rejects not yet written out: all of them without a ``sink``, else at most one
    #: batch (``rejects.BATCH_ROWS`` rejects or ``BATCH_CHARS`` raw characters)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    #: where the engines stream a task's rejects (``rejects.RejectsWriter``)
    sink: RejectsWriter | None = field(default=None, repr=False, compare=False)
    batch_rows: int = field(default=REJECT_BATCH_ROWS, repr=False, compare=False)
    batch_chars: int = field(default=REJECT_BATCH_CHARS, repr=False, compare=False)
    held_peak: int = field(default=0, init=False, repr=False, compare=False)  # most held at once
    _held_chars: int = field(default=0, init=False, repr=False, compare=False)

    def _add(self, reject: dict[str, Any]) -> None:
        self.rejects.append(reject)
        self._held_chars += len(reject["raw"] or "")
        self.held_peak = max(self.held_peak, len(self.rejects))
        if self.sink is not None and (len(self.rejects) >= self.batch_rows
                                      or self._held_chars >= self.batch_chars):
            self.flush_rejects()

    def flush_rejects(self) -> None:
        """Hand the rejects held to the sink (a no-op without one)."""
        if self.sink is not None:
            self.sink.write(self.rejects)
            self.rejects, self._held_chars = [], 0

    def summary(self) -> dict[str, Any]:
        """The file's entry in the manifest (without its rejects)."""
        return {"path": self.path, "status": self.status, "records": self.records,
                "rejected": self.rejected, "bytes": self.bytes, "error": self.error}

    def reject(self, reason: str, line: int | None = None, raw: str | None = None) -> None:
        self._add({"source": self.path, "line": line, "reason": reason,
                   "raw": None if raw is None else raw[:MAX_RAW_CHARS]})
        if line is not None:
            self.rejected += 1
            self.records += 1

    def reject_rows(self, reason: str, rows: int) -> None:
        """Reject every one of ``rows`` rows of the file with one reject line."""
        self.status = "rejected"
        self.error = reason
        self._add({"source": self.path, "line": None, "rows": rows, "reason": reason,
                   "raw": None})
        self.records += rows
        self.rejected += rows

    def file_error(self, status: str, error: str) -> None:
        self.status = status
        self.error = error
        self._add({"source": self.path, "line": None, "reason": f"{status}: {error}",
                   "raw": None})


def _json_text(value: Any) -> str:
    """The documented JSONL rule for carried values: strings as they are, else compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _as_arrow(data: bytes) -> pa.Array:
    """``data`` as a one-element ``large_binary`` array, without copying it."""
    offsets = pa.array([0, len(data)], pa.int64()).buffers()[1]
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])


def _valid_utf8(data: bytes, arr: pa.Array | None = None) -> bool:
    if data.isascii():
        return True
    try:
        (_as_arrow(data) if arr is None else arr).view(pa.large_string()).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _is_stringlike(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_string_list(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
             or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))
            and (_is_stringlike(t.value_type) or pa.types.is_null(t.value_type)))


def _invalid_rows(col: pa.ChunkedArray | pa.Array) -> list[int]:
    """Rows of ``col`` that fail full validation (invalid UTF-8 somewhere in them)."""
    try:
        col.validate(full=True)
        return []
    except pa.ArrowInvalid:
        pass
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    bad = []
    for i in range(len(arr)):
        try:
            arr.take(pa.array([i])).validate(full=True)
        except pa.ArrowInvalid:
            bad.append(i)
    return bad


class _DuplicateTracker:
    """``object_pairs_hook`` that remembers the repeated keys of the last object closed.

    ``json`` calls the hook innermost object first, so after ``decode`` returns
    an object the remembered keys are those of the top-level object.
    """

    def __init__(self) -> None:
        self.repeated: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        self.repeated = ([k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
                         if len(obj) != len(pairs) else [])
        return obj


class _Normalizer:
    """Turns raw parsed fields into the canonical schema for one source."""

    def __init__(self, spec: SourceSpec, task: InputTask) -> None:
        self.spec = spec
        self.task = task
        self.kind = spec.kind
        self.schema = (pretrain_schema if spec.kind == "pretrain" else sft_schema)(spec.columns)
        f = spec.fields
        self.main = [f.text] if spec.kind == "pretrain" else [f.prompt, f.responses]
        self.read_fields = set(self.parse_schema().names)
        self.dups = _DuplicateTracker()
        self.decoder = json.JSONDecoder(object_pairs_hook=self.dups)

    # -- careful path: one parsed JSON line --------------------------------------------------
    def record(self, obj: Any, line: int, report: FileReport, raw: str) -> dict | None:
        f = self.spec.fields
        if not isinstance(obj, dict):
            report.reject(f"not a JSON object ({type(obj).__name__})", line, raw)
            return None
        twice = [k for k in self.dups.repeated if k in self.read_fields]
        if twice:
            report.reject(f"field {twice[0]!r} appears more than once", line, raw)
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
            if srcs is not None and not (isinstance(srcs, list) and len(srcs) == len(responses)
                                         and all(isinstance(s, str) for s in srcs)):
                report.reject(f"field {f.response_sources!r} must be a list of strings as long "
                              f"as {f.responses!r}", line, raw)
                return None
            out["response_sources"] = srcs
        try:
            rid = obj.get(f.id) if f.id else None
            out["id"] = _json_text(rid) if rid is not None else f"{self.task.file_label}:{line}"
            dom = obj.get(f.domain) if f.domain else None
            out["domain"] = self.spec.domain or (_json_text(dom) if dom is not None else None)
            for c in self.spec.columns:
                v = obj.get(c)
                out[c] = None if v is None else _json_text(v)
        except ValueError:
            report.reject("a carried value holds NaN or an infinite number, which JSON text "
                          "cannot represent", line, raw)
            return None
        except RecursionError:
            report.reject("a carried value nests too deeply to be written as JSON text", line, raw)
            return None
        out["source"] = self.task.label
        out[ROW_KEY] = (self.task.file_index << KEY_POS_BITS) | line
        return out

    # -- fast path: a table parsed by pyarrow, or read from Parquet --------------------------
    def assemble(self, table: pa.Table, positions: np.ndarray,
                 carried_types: dict[str, pa.DataType] | None = None) -> pa.Table:
        """Canonical table from source columns; ``positions`` are the rows' line/row numbers."""
        f = self.spec.fields
        n = table.num_rows
        cols: dict[str, pa.Array | pa.ChunkedArray] = {}
        names = table.column_names
        ids = table.column(f.id) if f.id and f.id in names else None
        if ids is None or ids.null_count:
            derived = pc.binary_join_element_wise(
                pa.scalar(f"{self.task.file_label}:"),
                pa.array(np.asarray(positions, dtype=np.int64)).cast(pa.string()), "")
            ids = derived if ids is None else pc.coalesce(ids, derived)
        cols["id"] = ids
        if self.kind == "pretrain":
            cols["text"] = table.column(f.text)
        else:
            cols["prompt"] = table.column(f.prompt)
            cols["responses"] = table.column(f.responses)
            if f.response_sources and f.response_sources in names:
                cols["response_sources"] = table.column(f.response_sources)
            else:
                cols["response_sources"] = pa.nulls(n, pa.list_(pa.string()))
        if self.spec.domain is not None:
            cols["domain"] = pa.array([self.spec.domain] * n, pa.string())
        elif f.domain and f.domain in names:
            cols["domain"] = table.column(f.domain)
        else:
            cols["domain"] = pa.nulls(n, pa.string())
        cols["source"] = pa.array([self.task.label] * n, pa.string())
        cols[ROW_KEY] = make_keys(self.task.file_index, positions)
        schema = self.schema
        for c in self.spec.columns:
            cols[c] = table.column(c) if c in names else pa.nulls(n, pa.string())
            if carried_types and c in carried_types:
                schema = schema.set(schema.get_field_index(c), pa.field(c, carried_types[c]))
        # from_arrays, not pa.table(): the latter probes for pandas and imports it
        return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)

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

    def fast_rows_ok(self, table: pa.Table) -> bool:
        """Whether every row parsed by pyarrow is a record the careful path would keep as is."""
        f = self.spec.fields
        if any(table.column(c).null_count for c in self.main if c in table.column_names):
            return False
        if self.kind == "sft" and table.num_rows:
            resp = table.column(f.responses)
            lengths = pc.list_value_length(resp)
            if pc.min(lengths).as_py() == 0 or pc.list_flatten(resp).null_count:
                return False
            if f.response_sources and f.response_sources in table.column_names:
                srcs = table.column(f.response_sources)
                if srcs.null_count < len(srcs):
                    src_len = pc.list_value_length(srcs)
                    same = pc.fill_null(pc.equal(src_len, lengths), True)
                    if not pc.all(same).as_py() or pc.list_flatten(srcs).null_count:
                        return False
        return True


def _read_blocks(stream: io.IOBase, report: FileReport,
                 at_start: bool = True) -> Iterator[tuple[bytes, bool]]:
    """Yield (block of whole lines, is_last); a byte order mark is skipped only
    ``at_start`` of the file (a piece of a split file starts later). On a fault
    of the data every whole line before it is yielded, then the incomplete tail
    (last), and the file is marked with the fault's status (``truncated``,
    ``corrupt``). An I/O error is raised as an ``OSError`` naming the file (a
    fault of the machine: the run stops and resumes)."""
    chunks: list[bytes] = []
    size = 0
    first = at_start
    while True:
        try:
            chunk = stream.read(READ_CHUNK)
        except OSError as e:
            # a failing disk or a dropped connection is a fault of the machine, not bad
            # data: keeping the lines before it and calling the file "unreadable" would
            # lose the rest of the file from the output for good. Stop the run (one
            # `gristmill:` line, exit 1); the same command resumes once it is fixed.
            raise OSError(e.errno or errno.EIO, e.strerror or str(e), report.path) from e
        except StreamFault as e:
            report.file_error(e.status, str(e))
            data = b"".join(chunks)
            cut = data.rfind(b"\n")
            if cut >= 0:
                yield data[: cut + 1], False
            if len(data) > cut + 1:
                yield data[cut + 1:], True
            return
        if first and chunk:
            first = False
            if chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
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


def _record_lines(block: bytes, arr: pa.Array) -> tuple[int, np.ndarray] | None:
    """(number of lines, 0-based indexes of the lines that are not blank), or None
    when a line is a bare ``null`` (pyarrow 25 crashes with SIGSEGV on a parse
    chunk that starts with one; such a line is never a record anyway).

    Arrow's RE2 kernels scan the block (``arr``, zero copy); every pattern starts
    with a literal byte, which RE2 finds with ``memchr``, several times faster
    than ``bytes.count`` or ``re``. Only a block with blank lines is split in Python.
    """
    head = _HEAD.match(block)
    if (head and head.group(1) == b"null") or _count(arr, r"\r[ \t\r]*null"):
        return None  # arrow's chunker also splits at a carriage return
    n_lines = _count(arr, r"\n") + (0 if block.endswith(b"\n") else 1)
    tail = block[block.rfind(b"\n") + 1:]
    if not (head or (tail and not tail.strip(b" \t\r")) or _count(arr, r"\n[ \t\r]*(?:\n|null)")):
        return n_lines, np.arange(n_lines)
    keep = []
    for i, line in enumerate(block.split(b"\n")[:n_lines]):
        line = line.strip(b" \t\r")
        if line.startswith(b"null"):
            return None
        if line:
            keep.append(i)
    return n_lines, np.asarray(keep, dtype=np.int64)


def _count(arr: pa.Array, pattern: str) -> int:
    return pc.count_substring_regex(arr, pattern)[0].as_py()


class _JsonlBlockReader:
    """Parses blocks of JSONL lines, fast where it can, careful where it must."""

    def __init__(self, task: InputTask, spec: SourceSpec, report: FileReport,
                 batch_size: int) -> None:
        self.norm = _Normalizer(spec, task)
        self.report = report
        self.batch_size = batch_size
        self.parse_opts = pajson.ParseOptions(explicit_schema=self.norm.parse_schema(),
                                              unexpected_field_behavior="ignore")

    def fast(self, block: bytes, first_line: int) -> tuple[pa.Table, int] | None:
        """Canonical table of a block with pyarrow, or None if the careful path must judge."""
        arr = _as_arrow(block)
        if not _valid_utf8(block, arr):
            return None
        if block.startswith(BOM):
            return None
        lines = _record_lines(block, arr)
        if lines is None or not len(lines[1]):
            return None
        n_lines, idx = lines
        table = None
        # parse chunks of PARSE_CHUNK bytes (parsed in parallel); a line longer than
        # that straddles two chunks: the whole block in one chunk then
        for chunk in (PARSE_CHUNK, len(block) + 1):
            try:
                table = pajson.read_json(
                    pa.BufferReader(block), parse_options=self.parse_opts,
                    read_options=pajson.ReadOptions(block_size=chunk))
                break
            except (pa.ArrowInvalid, UnicodeDecodeError, ValueError) as e:
                if "straddl" not in str(e):
                    return None
        if table is None:
            return None
        # every non-blank line gives at least one row or fails: equal counts mean one each
        if table.num_rows != len(idx) or not self.norm.fast_rows_ok(table):
            return None
        return self.norm.assemble(table, idx + first_line), n_lines

    def careful(self, block: bytes, first_line: int, incomplete_tail: bool) -> Iterator[pa.Table]:
        """Line by line; every non-blank line becomes a record or a reject with its reason."""
        norm, report = self.norm, self.report
        rows: list[dict] = []
        lines = block.split(b"\n")
        n_lines = len(lines) - (1 if block.endswith(b"\n") else 0)
        for i, raw_line in enumerate(lines[:n_lines]):
            line_no = first_line + i
            if not raw_line.strip(b" \t\r"):
                continue
            cut_short = incomplete_tail and i == n_lines - 1
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                report.reject(_tail_reason(cut_short) or
                              f"invalid UTF-8: {e.reason} at byte {e.start}", line_no,
                              raw_line.decode("utf-8", "backslashreplace"))
                continue
            try:
                obj = norm.decoder.decode(text)
            except json.JSONDecodeError as e:
                report.reject(_tail_reason(cut_short) or
                              f"malformed JSON: {e.msg} at column {e.colno}", line_no, text)
                continue
            except (RecursionError, ValueError) as e:
                # limits of Python's json, not of JSON (nesting depth, an integer longer
                # than int's digit limit): pyarrow, which has neither, judges the line
                got = self.fast(raw_line + b"\n", line_no)
                if got is None:
                    limit = ("nesting too deep" if isinstance(e, RecursionError)
                             else f"number too long ({e})")
                    report.reject(f"{limit} for Python's JSON parser, and not a record for "
                                  "pyarrow's", line_no, text)
                    continue
                yield from self._flush(rows)
                rows = []
                report.records += 1
                yield got[0]
                continue
            if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
                report.reject("lone surrogate in a JSON string (\\ud800-\\udfff escape "
                              "without its pair)", line_no, text)
                continue
            rec = norm.record(obj, line_no, report, text)
            if rec is not None:
                rows.append(rec)
            if len(rows) >= self.batch_size:
                yield from self._flush(rows)
                rows = []
        yield from self._flush(rows)

    def _flush(self, rows: list[dict]) -> Iterator[pa.Table]:
        if not rows:
            return
        try:
            table = pa.Table.from_pylist(rows, schema=self.norm.schema)
        except (pa.ArrowException, UnicodeError, ValueError, TypeError):
            good = []
            for r in rows:
                try:
                    pa.Table.from_pylist([r], schema=self.norm.schema)
                    good.append(r)
                except (pa.ArrowException, UnicodeError, ValueError, TypeError) as e:
                    self.report.reject(f"cannot be stored: {type(e).__name__}: {e}",
                                       int(r[ROW_KEY]) & ((1 << KEY_POS_BITS) - 1), None)
            if not good:
                return
            table = pa.Table.from_pylist(good, schema=self.norm.schema)
        self.report.records += table.num_rows
        yield table


def _tail_reason(cut_short: bool) -> str | None:
    return "incomplete last line of a truncated file" if cut_short else None


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (RecursionError, ValueError):
        return False
    return False


def read_jsonl(task: InputTask, spec: SourceSpec, report: FileReport,
               batch_size: int, tap: Callable[[bytes], Any] | None = None) -> Iterator[pa.Table]:
    reader = _JsonlBlockReader(task, spec, report, batch_size)
    line_no = task.first_line
    try:
        stream = (open_binary(task.path, tap) if task.end < 0 else
                  open_range(task.path, task.start, task.end, tap) if task.frame_offset < 0
                  else FrameRange(task.path, task.frame_offset, task.frame_base, task.start,
                                  task.end, tap))
    except OSError as e:
        report.file_error("unreadable", f"{type(e).__name__}: {e}")
        return
    with stream:
        for block, last in _read_blocks(stream, report, at_start=task.start == 0):
            got = reader.fast(block, line_no)
            if got is not None:
                out, n_lines = got
                report.records += out.num_rows
                line_no += n_lines
                for start in range(0, out.num_rows, batch_size):
                    yield out.slice(start, batch_size)
                continue
            incomplete = last and report.status in ("truncated", "corrupt")
            yield from reader.careful(block, line_no, incomplete)
            line_no += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    if report.records == 0 and report.status == "ok" and not task.is_piece:
        report.file_error("empty", "no records in file")  # a split file: see splits.merge


def _parquet_plan(norm: _Normalizer, schema: pa.Schema) -> tuple[list[str], str | None]:
    """(columns to read, or the reason the whole file is rejected)."""
    f = norm.spec.fields
    names = schema.names
    missing = [c for c in norm.main if c not in names]
    if missing:
        return [], f"missing column(s) {missing}; the file has {names}"
    checks: list[tuple[str, Any, str]] = []
    if norm.kind == "pretrain":
        checks.append((f.text, _is_stringlike, "a string"))
    else:
        checks += [(f.prompt, _is_stringlike, "a string"),
                   (f.responses, _is_string_list, "a list of strings")]
        if f.response_sources:
            checks.append((f.response_sources, _is_string_list, "a list of strings"))
    id_ok = lambda t: _is_stringlike(t) or pa.types.is_integer(t)  # noqa: E731
    if f.id:
        checks.append((f.id, id_ok, "a string or an integer (or map `fields: {id: null}`)"))
    if f.domain and norm.spec.domain is None:
        checks.append((f.domain, id_ok, "a string or an integer"))
    for name, ok, what in checks:
        if name in names:
            t = schema.field(name).type
            if not (ok(t) or pa.types.is_null(t)):
                return [], f"column {name!r} is {t}, not {what}"
    return [c for c in norm.parse_schema().names if c in names], None


def _canonical_parquet(table: pa.Table, norm: _Normalizer) -> pa.Table:
    """Lossless normalization of the fields we read: string kinds to ``string``,
    integer ids/domains to decimal strings; carried columns untouched."""
    f = norm.spec.fields
    carried = set(norm.spec.columns)
    for i, name in enumerate(table.column_names):
        if name in carried and name not in (f.id, f.text, f.domain, f.prompt, f.responses,
                                            f.response_sources):
            continue
        t = table.schema.field(name).type
        target = (pa.list_(pa.string()) if name in (f.responses, f.response_sources)
                  and norm.kind == "sft" else pa.string())
        if t != target:
            col = table.column(name)
            if pa.types.is_dictionary(t):
                col = col.cast(t.value_type)
            table = table.set_column(i, name, col.cast(target))
    return table


def read_parquet(task: InputTask, spec: SourceSpec, report: FileReport,
                 batch_size: int, local_copy: str | None = None) -> Iterator[pa.Table]:
    """Rows of a Parquet file, or of the piece's row groups (``task.row_groups``);
    ``local_copy``: a local file holding the object's bytes, read instead of it."""
    norm = _Normalizer(spec, task)
    try:
        # a piece of a split object reads its row groups' column chunks and the footer,
        # each fetched as it is (no read-ahead into the next piece's row groups)
        pf = pq.ParquetFile(local_copy if local_copy is not None else task.path
                            if not storage.is_remote(task.path) else
                            storage.open_ranges(task.path) if task.is_piece
                            else storage.open_read(task.path))
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        report.file_error("unreadable", f"{type(e).__name__}: {e}")
        return
    total = pf.metadata.num_rows
    columns, problem = _parquet_plan(norm, schema)
    if problem is not None:
        if task.part == 0:  # the first piece of a split file rejects the whole file
            report.reject_rows(f"{problem}: all {total} rows rejected, nothing cast", total)
        return
    carried_types = {c: schema.field(c).type for c in spec.columns if c in schema.names}
    f = spec.fields
    row0 = task.first_row
    groups = task.row_groups if task.row_groups is not None else \
        range(pf.metadata.num_row_groups)
    # batches never span two row groups, so a piece of a split file batches its rows
    # (and counts their bytes) exactly as the whole file does
    batches = (rb for g in groups for rb in pf.iter_batches(batch_size=batch_size,
                                                           columns=columns, row_groups=[g]))
    try:
        for rb in batches:
            table = pa.Table.from_batches([rb])
            n = table.num_rows
            report.bytes += table.nbytes
            table = _canonical_parquet(table, norm)
            reasons: dict[int, str] = {}
            for c in norm.main:
                col = table.column(c)
                if col.null_count:
                    for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
                        reasons.setdefault(int(i), f"null {c!r}")
            if norm.kind == "sft":
                resp = table.column(f.responses)
                lengths = pc.fill_null(pc.list_value_length(resp), 0).to_numpy()
                for i in np.flatnonzero(lengths == 0):
                    reasons.setdefault(int(i), f"field {f.responses!r} is an empty list")
                if pc.list_flatten(resp).null_count:
                    for i, v in enumerate(resp.to_pylist()):
                        if v and any(s is None for s in v):
                            reasons.setdefault(i, f"null item in {f.responses!r}")
                if f.response_sources in table.column_names:
                    srcs = table.column(f.response_sources).to_pylist()
                    for i, (s, r) in enumerate(zip(srcs, resp.to_pylist(), strict=True)):
                        if s is not None and (r is None or len(s) != len(r) or None in s):
                            reasons.setdefault(i, f"field {f.response_sources!r} must be a "
                                               f"list of strings as long as {f.responses!r}")
            for c in table.column_names:
                for i in _invalid_rows(table.column(c)):
                    reasons.setdefault(i, f"invalid UTF-8 in column {c!r}")
            positions = np.arange(row0, row0 + n)
            if reasons:
                for i in sorted(reasons):
                    report.reject(reasons[i], row0 + i, None)
                keep = np.ones(n, dtype=bool)
                keep[list(reasons)] = False
                table = table.filter(pa.array(keep))
                positions = positions[keep]
            report.records += table.num_rows
            row0 += n
            yield norm.assemble(table, positions, carried_types)
    except (pa.ArrowException, OSError) as e:
        report.file_error("corrupt", f"{type(e).__name__}: {e} (after row {row0} of {total}; "
                          "the rows before are kept)")
    if report.records == 0 and report.status == "ok" and not task.is_piece:
        report.file_error("empty", "no rows in file")


def read_task(task: InputTask, spec: SourceSpec, report: FileReport,
              batch_size: int, tap: Callable[[bytes], Any] | None = None,
              local_copy: str | None = None) -> Iterator[pa.Table]:
    """Stream one input file (or the piece of it a task names) as canonical Arrow
    tables of at most ``batch_size`` rows.

    ``tap`` sees the raw bytes of a JSONL file as they are read (the caller hashes
    them); a Parquet file is read by ranges, not in order, and is not tapped
    (``local_copy``: a local file with the object's bytes, read instead)."""
    tables = (read_jsonl(task, spec, report, batch_size, tap) if task.format == "jsonl"
              else read_parquet(task, spec, report, batch_size, local_copy))
    for table in tables:
        if table.num_rows:
            yield table
