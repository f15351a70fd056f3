"""Split big inputs into several tasks, and put the pieces' results back together per file.

What splits (``engine.split_size``, default 256 MB; ``null`` or 0: never)
    An uncompressed JSONL file larger than ``split_size`` becomes
    ``n = ceil(size / split_size)`` tasks, each a byte range of whole lines:
    range ``k`` starts at the first line start at or after ``k * size / n``
    (a line longer than a range stays whole, in the range where it starts; a
    target inside it is skipped). A ``.zst`` JSONL file larger than
    ``split_size`` made of several independent frames (``pzstd``, seekable-zstd
    writers, concatenated ``.zst`` files) is cut the same way over its
    decompressed bytes, at frame starts: range ``k`` starts at the first line
    start at or after the first decompressed byte of the first frame that starts
    at or after ``k * size / n`` compressed bytes, and its task decodes from that
    frame on (a line may span frames: it belongs to the range it starts in). A
    single-frame ``.zst`` file stays one task (a frame cannot be entered in the
    middle), and so does every ``.gz`` file (nor can a gzip member). A Parquet
    file larger than ``split_size`` with several row groups becomes runs of
    consecutive row groups of about ``size / n`` compressed bytes each.

Row identity does not depend on splitting
    A task's rows keep the unsplit file's row keys (``stage.ROW_KEY`` =
    ``file index << 40 | line or row``): the planning pass counts the lines
    before every range (``first_line``), Parquet row offsets come from the
    footer (``first_row``). Every stage derives its randomness from the key, so
    a split run keeps, drops and samples the same records; only the shard
    layout differs (a task's rows go to its own shards, named in task order).
    The split depends on the file and ``split_size`` only, never on the worker
    count, so ``workers: 1`` and ``workers: N`` write the same bytes.

The planning pass (where it runs, what it costs)
    Before the tasks run, every file to split is read once by a planning task
    (``plan_file``), one task per file on the engine's workers (``plan_splits``
    with the engine's ``map_files``: the local pool, Dask workers; Beam plans in
    a local pool before the pipeline is built), the plans put together in file
    order; each task reads:
    ``bytes.find``/``count`` of newlines and ``xxh3_128`` of the whole file
    (plus an ``xxh3_64`` of each range), several GB/s on a local disk, so the
    file is read twice in all (on an object store: downloaded twice; an
    unsplit file is still read once). A zstd file is first walked frame header
    by block header (no decompression, at most ``max(split_size, 64 MiB)``
    bytes: a single-frame file ends there), and a multi-frame one is then read
    and decompressed once whole, to count the newlines before every range: the
    decompression of one unsplit read, without the parsing. A Parquet file's
    plan reads its footer
    and hashes the whole file once; each piece then fetches only the footer and
    the column chunks of its own row groups (``storage.open_ranges``: no
    read-ahead into other pieces' bytes); a Parquet file without a readable
    footer is one task (its reader reports it). Each planning task records its
    plan in ``_work/plans`` (a pass stopped half way does not plan those files
    again), and the whole plan is saved in ``_work/run.json``; a resume whose
    inputs are unchanged uses it and reads nothing again.

A file that changes after planning
    Each piece checks the file's size and mtime against the plan before and
    after it reads, and a JSONL piece hashes its bytes (a zstd piece: its
    decompressed bytes) against the plan's range hash: any difference raises
    ``inputs.InputChangedDuringRun``.

Per-file bookkeeping
    A piece reports its counts, status and rejects like a file; ``merge_files``
    sums the pieces' counts into one manifest entry per input file (status: the
    first piece's that is not ``ok``; a file with no records is ``empty``), and
    the runner concatenates the pieces' rejects, in order, into the file's one
    rejects file. Id ledgers stay per task; repeated ids are counted over all
    of them, so an id repeated in two pieces of one file is found.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
import zstandard

from gristmill.pipeline import storage
from gristmill.pipeline.decompress import COMPRESSED_CHUNK, compression_of, zstd_data_frames
from gristmill.pipeline.inputs import InputChangedDuringRun, hash_file
from gristmill.pipeline.readers import InputTask

PLAN_CHUNK = 8 << 20  # bytes read at a time by the planning pass
PLAN_FEED = COMPRESSED_CHUNK  # compressed bytes decompressed at a time (as the reader does)
#: a zstd file whose second data frame does not start within max(split_size, this)
#: compressed bytes is one task: the frame walk that finds out reads no further
ZSTD_WALK = 64 << 20
HASH_NAME = "xxh3_128"
RANGE_HASH = "range_xxh3_64"


def splittable(task: InputTask) -> bool:
    """Whether a file can be split at all: JSONL, uncompressed or zstd (by frames,
    where it has several), or Parquet; never gzip."""
    if task.format == "jsonl":
        return compression_of(task.path) != "gz"
    return task.format == "parquet"


class LineCuts:
    """The JSONL byte-range rule over a byte stream fed in order.

    Range ``k`` starts at the first line start at or after target ``k`` (a line
    longer than a range stays whole, in the range where it starts: a target inside
    it is skipped). For every range: ``[start, end, first_line, xxh3_64]``, where
    ``first_line`` is the 1-based number of its first line (1 + the newlines before
    it), as the reader counts. Targets come in increasing order, all up front (a
    plain file) or while the stream is fed (a zstd file: a frame start's
    decompressed offset, never behind the bytes already fed).
    """

    def __init__(self, targets: Iterable[int] = ()) -> None:
        self.targets = deque(targets)
        self.ranges: list[list[Any]] = []
        self.start = self.pos = self.lines = 0
        self.first_line = 1
        self.last = b""  # the last byte fed
        self.piece = xxhash.xxh3_64()

    def add_target(self, target: int) -> None:
        if target < self.pos:
            raise ValueError(f"target {target} is behind the {self.pos} bytes fed")
        if target == self.pos and self.last == b"\n":
            if target > self.start:
                self._cut(target)  # a line ended right before the target
        else:
            self.targets.append(target)

    def _cut(self, at: int) -> None:
        self.ranges.append([self.start, at, self.first_line, self.piece.hexdigest()])
        self.start, self.first_line, self.lines = at, self.first_line + self.lines, 0
        self.piece.reset()

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        off = 0
        while self.targets:
            target = self.targets[0]
            if target <= self.start:  # inside a long line an earlier cut skipped
                self.targets.popleft()
                continue
            lo = max(target - 1 - self.pos, off)
            if lo >= len(chunk):
                break
            nl = chunk.find(b"\n", lo)
            if nl < 0:
                break
            self.lines += chunk.count(b"\n", off, nl + 1)
            self.piece.update(view[off:nl + 1])
            off = nl + 1
            self._cut(self.pos + off)
            self.targets.popleft()
        self.lines += chunk.count(b"\n", off)
        self.piece.update(view[off:])
        self.pos += len(chunk)
        if chunk:
            self.last = chunk[-1:]

    def finish(self) -> list[list[Any]]:
        """The ranges, the last one ending at the end of the stream (a cut at the
        very end makes no empty range)."""
        self.ranges.append([self.start, self.pos, self.first_line, self.piece.hexdigest()])
        if len(self.ranges) > 1 and self.start == self.pos:
            self.ranges.pop()
        return self.ranges


def _stable(path: str, before: dict[str, int], read: int) -> None:
    after = storage.stat(path)
    if after != before or read != before["size"]:
        raise InputChangedDuringRun(
            f"input {path} changed while the run planned its split (size {before['size']} -> "
            f"{after['size']} bytes, {read} read); rerun when the input is stable")


def plan_jsonl(path: str, split_size: int) -> dict[str, Any]:
    """Read ``path`` once: its ``xxh3_128`` and its ranges of whole lines.

    Returns ``{"size", "mtime_ns", "xxh3_128", "ranges": [[start, end,
    first_line, range_xxh3_64], ...]}`` (``LineCuts``); range ``k`` starts at the
    first line start at or after ``k * size / n``.
    """
    before = storage.stat(path)
    size = before["size"]
    n = max(1, math.ceil(size / split_size))
    cuts = LineCuts(k * size // n for k in range(1, n))
    whole = xxhash.xxh3_128()
    with storage.open_read(path) as f:
        while chunk := f.read(PLAN_CHUNK):
            whole.update(chunk)
            cuts.feed(chunk)
    _stable(path, before, cuts.pos)
    return {**before, HASH_NAME: whole.hexdigest(), "ranges": cuts.finish()}


def plan_zstd(path: str, split_size: int) -> dict[str, Any]:
    """Ranges of whole lines of a multi-frame zstd file, each starting in its own
    frame: the JSONL rule (``LineCuts``) over the decompressed bytes, with targets at
    frame starts.

    Range ``k`` is cut at the first frame that starts at or after ``k * size / n``
    compressed bytes, and starts at the first line start at or after that frame's
    first decompressed byte (records may span frames: a range owns every line that
    starts in it). A range records where decoding starts: the compressed offset of
    the last frame starting at or before its first byte, and that frame's
    decompressed offset. Returns ``{"size", "mtime_ns", "xxh3_128", "ranges":
    [[start, end, first_line, range_xxh3_64, frame_offset, frame_base], ...]}``, with
    ``start``/``end`` in decompressed bytes and the hash over them; no ranges when the
    file has fewer than two data frames, or is truncated or corrupt (one task: the
    reader reports the fault as for any file).

    Cost: first the frame headers are walked (``decompress.zstd_data_frames``, no
    decompression) up to the second data frame, looking no further than
    ``max(split_size, ZSTD_WALK)`` compressed bytes: a file whose first frame is
    longer (a single-frame file, what the ``zstd`` command writes) is one task, found
    out for a few bytes per block of a local file, or at most that many bytes of an
    object's download. Then, only for several frames, one read of the file that
    hashes it and decompresses all of it, counting newlines (line numbers need every
    byte before a range): the work of one unsplit read without the parsing, in the
    file's planning task (``plan_file``), before the tasks run.
    """
    before = storage.stat(path)
    size = before["size"]
    if zstd_data_frames(path, stop_at=2, limit=max(split_size, ZSTD_WALK)) < 2:
        return {**before, "ranges": []}
    n = max(1, math.ceil(size / split_size))
    targets = deque(k * size // n for k in range(1, n))
    cuts = LineCuts()
    whole = xxhash.xxh3_128()
    frame = (0, 0)  # (compressed, decompressed) offset of the frame being decoded
    starts = [frame]  # where decoding of each range starts
    moving: list[int] = []  # ranges whose start may yet fall in a later frame
    last_target = 0
    dec, read, consumed = None, 0, 0

    def new_ranges() -> None:
        while len(starts) <= len(cuts.ranges):
            starts.append(frame)
            moving.append(len(starts) - 1)

    with storage.open_read(path) as f:
        while chunk := f.read(PLAN_CHUNK):
            whole.update(chunk)
            read += len(chunk)
            for at in range(0, len(chunk), PLAN_FEED):
                data = chunk[at:at + PLAN_FEED]
                while data:
                    if dec is None:  # a frame starts here
                        frame = (consumed, cuts.pos)
                        # a range whose first byte is this frame's first byte starts
                        # decoding here, not in the frame before (that one is over)
                        moving = [j for j in moving if cuts.ranges[j - 1][1] == cuts.pos]
                        for j in moving:
                            starts[j] = frame
                        if targets and consumed >= targets[0]:
                            while targets and consumed >= targets[0]:
                                targets.popleft()
                            if cuts.pos > last_target:
                                last_target = cuts.pos
                                cuts.add_target(cuts.pos)
                                new_ranges()
                        dec = zstandard.ZstdDecompressor().decompressobj()
                    try:
                        out = dec.decompress(data)
                    except zstandard.ZstdError:
                        return {**before, "ranges": []}  # corrupt: read as one task
                    cuts.feed(out)
                    new_ranges()
                    if dec.eof:
                        consumed += len(data) - len(dec.unused_data)
                        data, dec = dec.unused_data, None
                    else:
                        consumed += len(data)
                        data = b""
    _stable(path, before, read)
    if dec is not None:
        return {**before, "ranges": []}  # ends inside a frame: read as one task
    ranges = cuts.finish()
    return {**before, HASH_NAME: whole.hexdigest(),
            "ranges": [r + list(start) for r, start in
                       zip(ranges, starts[:len(ranges)], strict=True)]}


def plan_parquet(path: str, split_size: int) -> dict[str, Any]:
    """Runs of consecutive row groups of about ``size / n`` compressed bytes each,
    from the footer, and the file's ``xxh3_128`` (one more read of the file).

    Returns ``{"size", "mtime_ns", "xxh3_128", "pieces": [[row_groups,
    first_row], ...]}``.
    """
    before = storage.stat(path)
    with storage.open_ranges(path) as f:  # the footer only
        try:
            md = pq.ParquetFile(f).metadata
        except pa.ArrowInvalid:  # no Parquet footer: one task, the reader reports the fault
            return {**before, "pieces": []}
    sizes = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        sizes.append((rg.num_rows, sum(rg.column(j).total_compressed_size
                                       for j in range(rg.num_columns))))
    total = sum(b for _, b in sizes) or 1
    n = max(1, min(len(sizes), math.ceil(before["size"] / split_size)))
    pieces: list[list[Any]] = []
    groups: list[int] = []
    first_row = row = acc = 0
    for i, (rows, nbytes) in enumerate(sizes):
        groups.append(i)
        row += rows
        acc += nbytes
        # cut when this run reaches its share: piece k ends at k * total / n bytes
        if len(pieces) < n - 1 and acc * n >= (len(pieces) + 1) * total and i < len(sizes) - 1:
            pieces.append([groups, first_row])
            groups, first_row = [], row
    if groups:
        pieces.append([groups, first_row])
    digest = hash_file(path)
    after = storage.stat(path)
    if after != before:
        raise InputChangedDuringRun(
            f"input {path} changed while the run planned its split (size {before['size']} -> "
            f"{after['size']} bytes); rerun when the input is stable")
    return {**before, HASH_NAME: digest, "pieces": pieces}


def plan_file(path: str, fmt: str, split_size: int,
              record: str | None = None) -> dict[str, Any] | None:
    """One planning task: the split plan of one file, or None when it stays one task.

    Runs wherever the engine runs it (a pool process, a Dask worker, or here);
    the result is small. With ``record`` (a path in the run's ``_work/plans``),
    the result is also written there, with the file's format, size and mtime,
    the ``split_size`` and the process that planned it (host, pid), so that a
    run killed during the planning pass and started again does not plan this
    file a second time (``plan_splits``).
    """
    planner = plan_parquet if fmt == "parquet" else \
        plan_zstd if compression_of(path) == "zst" else plan_jsonl
    plan = planner(path, split_size)
    result = plan if len(plan.get("ranges") or plan.get("pieces") or []) > 1 else None
    if record is not None:
        storage.write_bytes(record, json.dumps(
            {"path": path, "format": fmt, "split_size": split_size, "size": plan["size"],
             "mtime_ns": plan["mtime_ns"], "plan": result,
             "planned_by": {"host": socket.gethostname(), "pid": os.getpid()}}).encode())
    return result


def _recorded(record: Any, path: str, fmt: str,
              split_size: int) -> tuple[bool, dict[str, Any] | None]:
    """(True, plan) when ``record`` holds the plan of ``path`` as it is now, read as
    ``fmt``, at this ``split_size``; (False, None) otherwise."""
    if not storage.exists(record):
        return False, None
    try:
        rec = json.loads(storage.read_bytes(record))
    except ValueError:  # a damaged record is planned again
        return False, None
    if (rec.get("path"), rec.get("format"), rec.get("split_size")) != (path, fmt, split_size):
        return False, None
    if {k: rec.get(k) for k in ("size", "mtime_ns")} != storage.stat(path):
        return False, None
    return True, rec["plan"]


def serial_map(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
    """``fn(*a)`` for every ``a``, here, one after another; results in order."""
    return [fn(*a) for a in args]


def plan_splits(files: list[InputTask], split_size: int | None,
                map_fn: Callable[[Callable[..., Any], list[tuple]], list[Any]] | None = None,
                records: Any = None) -> dict[str, dict[str, Any]]:
    """The split plan of every file worth splitting (larger than ``split_size``),
    by path, in file order; files not in it are one task each.

    ``map_fn(plan_file, args)`` runs one planning task per file and returns the
    results in the order of ``args``: the engine's map (a process pool, Dask
    workers; ``LocalEngine.map_files``...), or ``serial_map`` here. The plans are
    put together in file order whatever order the tasks finished in, so the plan
    is the same for any map and worker count. With ``records`` (a folder), each
    task writes its result there (``plan_file``) and a file whose record matches
    it (same path, format, size, mtime and ``split_size``) is not planned again.
    """
    if not split_size:
        return {}
    todo = [f for f in files if f.size > split_size and splittable(f)]
    found: dict[str, dict[str, Any] | None] = {}
    args = []
    for f in todo:
        record = None if records is None else records / f"file-{f.index:05d}.json"
        if record is not None:
            done, plan = _recorded(record, f.path, f.format, split_size)
            if done:
                found[f.path] = plan
                continue
        args.append((f.path, f.format, split_size, None if record is None else str(record)))
    if args:
        found.update(zip([a[0] for a in args], (map_fn or serial_map)(plan_file, args),
                         strict=True))
    return {f.path: found[f.path] for f in todo if found[f.path] is not None}


def split_tasks(files: list[InputTask], plans: dict[str, dict[str, Any]]) -> list[InputTask]:
    """Tasks in file order, a file's pieces in byte order; ``index`` numbers the
    tasks, ``file_index`` keeps the file's number (row keys)."""
    tasks: list[InputTask] = []
    for f in files:
        plan = plans.get(f.path)
        if plan is None:
            tasks.append(replace(f, index=len(tasks), file_index=f.index))
            continue
        stamp = {k: plan[k] for k in ("size", "mtime_ns", HASH_NAME)}
        if f.format == "jsonl":
            parts = plan["ranges"]
            # a zstd range: decoding starts at compressed byte ``frame_offset``; its
            # size is its frames' compressed bytes (the pieces' sizes sum to the file's)
            offsets = [r[4] for r in parts[1:]] + [plan["size"]] if len(parts[0]) > 4 else []
            for k, (start, end, first_line, digest, *frame) in enumerate(parts):
                frame_offset, frame_base = frame or (-1, 0)
                size = offsets[k] - frame_offset if frame else end - start
                tasks.append(replace(f, index=len(tasks), file_index=f.index, part=k,
                                     parts=len(parts), start=start, end=end,
                                     first_line=first_line, frame_offset=frame_offset,
                                     frame_base=frame_base, size=size,
                                     planned={**stamp, RANGE_HASH: digest}))
        else:
            parts = plan["pieces"]
            for k, (groups, first_row) in enumerate(parts):
                tasks.append(replace(f, index=len(tasks), file_index=f.index, part=k,
                                     parts=len(parts), row_groups=list(groups),
                                     first_row=first_row, size=f.size // len(parts),
                                     planned=dict(stamp)))
    return tasks


SUMMED = ("records", "rejected", "bytes")


def merge_files(tasks: list[InputTask], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One manifest entry per input file from its tasks' entries (``reports[i]``
    belongs to ``tasks[i]``): counts summed, the first status that is not
    ``ok`` (with its error), ``empty`` when no piece found a record."""
    by_file: dict[int, list[tuple[InputTask, dict[str, Any]]]] = {}
    for t, r in zip(tasks, reports, strict=True):
        by_file.setdefault(t.file_index, []).append((t, r))
    out = []
    for index, pieces in by_file.items():
        t0, first = pieces[0]
        entry = dict(first)
        if len(pieces) > 1:
            for key in SUMMED:
                entry[key] = sum(r.get(key, 0) or 0 for _, r in pieces)
            bad = next((r for _, r in pieces if r.get("status", "ok") != "ok"), None)
            if bad is not None:
                entry["status"], entry["error"] = bad["status"], bad.get("error")
            elif entry.get("records", 0) == 0:
                entry["status"], entry["error"] = "empty", empty_error(t0)
        out.append({**entry, "path": t0.file_label, "source": t0.label, "index": index})
    return out


def empty_error(task: InputTask) -> str:
    """The error of a file with no records, as the reader words it."""
    return "no records in file" if task.format == "jsonl" else "no rows in file"


def empty_reject(task: InputTask) -> dict[str, Any]:
    """The reject line a reader writes for a file with no records."""
    return {"source": task.path, "line": None, "reason": f"empty: {empty_error(task)}",
            "raw": None}
