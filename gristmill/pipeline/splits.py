"""Split big inputs into several tasks, and put the pieces' results back together per file.

What splits (``engine.split_size``, default 256 MB; ``null`` or 0: never)
    An uncompressed JSONL file larger than ``split_size`` becomes
    ``n = ceil(size / split_size)`` tasks, each a byte range of whole lines:
    range ``k`` starts at the first line start at or after ``k * size / n``
    (a line longer than a range stays whole, in the range where it starts; a
    target inside it is skipped). A Parquet file larger than ``split_size``
    with several row groups becomes runs of consecutive row groups of about
    ``size / n`` compressed bytes each. ``.gz`` and ``.zst`` files stay one task
    each: a gzip member cannot be entered in the middle, and zstd frames are not
    split (yet; see docs/engines.md).

Row identity does not depend on splitting
    A task's rows keep the unsplit file's row keys (``stage.ROW_KEY`` =
    ``file index << 40 | line or row``): the planning pass counts the lines
    before every range (``first_line``), Parquet row offsets come from the
    footer (``first_row``). Every stage derives its randomness from the key, so
    a split run keeps, drops and samples the same records; only the shard
    layout differs (a task's rows go to its own shards, named in task order).
    The split depends on the file and ``split_size`` only, never on the worker
    count, so ``workers: 1`` and ``workers: N`` write the same bytes.

The planning pass (what it costs)
    Before the tasks run, the driver reads every file it splits once, in order:
    ``bytes.find``/``count`` of newlines and ``xxh3_128`` of the whole file
    (plus an ``xxh3_64`` of each range), several GB/s on a local disk, so the
    file is read twice in all (on an object store: downloaded twice; an
    unsplit file is still read once). A Parquet file is read once more to hash
    it (as an unsplit local Parquet file already was). The plan is saved in
    ``_work/run.json``; a resume whose inputs are unchanged uses it and reads
    nothing again.

A file that changes after planning
    Each piece checks the file's size and mtime against the plan before and
    after it reads, and a JSONL piece hashes its bytes against the plan's range
    hash: any difference raises ``inputs.InputChangedDuringRun``.

Per-file bookkeeping
    A piece reports its counts, status and rejects like a file; ``merge_files``
    sums the pieces' counts into one manifest entry per input file (status: the
    first piece's that is not ``ok``; a file with no records is ``empty``), and
    the runner concatenates the pieces' rejects, in order, into the file's one
    rejects file. Id ledgers stay per task; repeated ids are counted over all
    of them, so an id repeated in two pieces of one file is found.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pyarrow.parquet as pq
import xxhash

from gristmill.pipeline import storage
from gristmill.pipeline.inputs import InputChangedDuringRun, hash_file
from gristmill.pipeline.readers import InputTask

PLAN_CHUNK = 8 << 20  # bytes read at a time by the planning pass
COMPRESSED = (".gz", ".zst")
HASH_NAME = "xxh3_128"
RANGE_HASH = "range_xxh3_64"


def splittable(task: InputTask) -> bool:
    """Whether a file can be split at all: uncompressed JSONL, or Parquet."""
    if task.format == "jsonl":
        return not task.path.lower().endswith(COMPRESSED)
    return task.format == "parquet"


def plan_jsonl(path: str, split_size: int) -> dict[str, Any]:
    """Read ``path`` once: its ``xxh3_128`` and its ranges of whole lines.

    Returns ``{"size", "mtime_ns", "xxh3_128", "ranges": [[start, end,
    first_line, range_xxh3_64], ...]}``; ``first_line`` is the 1-based number of
    the range's first line (1 + the newlines before it), as the reader counts.
    """
    before = storage.stat(path)
    size = before["size"]
    n = max(1, math.ceil(size / split_size))
    targets = [k * size // n for k in range(1, n)]
    whole, piece = xxhash.xxh3_128(), xxhash.xxh3_64()
    ranges: list[list[Any]] = []
    start, first_line, lines, pos, ti = 0, 1, 0, 0, 0
    with storage.open_read(path) as f:
        while chunk := f.read(PLAN_CHUNK):
            whole.update(chunk)
            view = memoryview(chunk)
            off = 0
            while ti < len(targets):
                if targets[ti] <= start:  # inside a long line an earlier cut skipped
                    ti += 1
                    continue
                lo = max(targets[ti] - 1 - pos, off)
                if lo >= len(chunk):
                    break
                nl = chunk.find(b"\n", lo)
                if nl < 0:
                    break
                lines += chunk.count(b"\n", off, nl + 1)
                piece.update(view[off:nl + 1])
                off = nl + 1
                cut = pos + off
                if cut < size:
                    ranges.append([start, cut, first_line, piece.hexdigest()])
                    start, first_line, lines = cut, first_line + lines, 0
                    piece.reset()
                ti += 1
            lines += chunk.count(b"\n", off)
            piece.update(view[off:])
            pos += len(chunk)
    ranges.append([start, pos, first_line, piece.hexdigest()])
    after = storage.stat(path)
    if after != before or pos != size:
        raise InputChangedDuringRun(
            f"input {path} changed while the run planned its split (size {size} -> "
            f"{after['size']} bytes, {pos} read); rerun when the input is stable")
    return {**before, HASH_NAME: whole.hexdigest(), "ranges": ranges}


def plan_parquet(path: str, split_size: int) -> dict[str, Any]:
    """Runs of consecutive row groups of about ``size / n`` compressed bytes each,
    from the footer, and the file's ``xxh3_128`` (one more read of the file).

    Returns ``{"size", "mtime_ns", "xxh3_128", "pieces": [[row_groups,
    first_row], ...]}``.
    """
    before = storage.stat(path)
    with storage.open_read(path) as f:
        md = pq.ParquetFile(f).metadata
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


def plan_splits(files: list[InputTask], split_size: int | None) -> dict[str, dict[str, Any]]:
    """The split plan of every file worth splitting (larger than ``split_size``),
    by path; files not in it are one task each."""
    plans: dict[str, dict[str, Any]] = {}
    if not split_size:
        return plans
    for f in files:
        if f.size <= split_size or not splittable(f):
            continue
        plan = (plan_jsonl if f.format == "jsonl" else plan_parquet)(f.path, split_size)
        if len(plan.get("ranges") or plan.get("pieces") or []) > 1:
            plans[f.path] = plan
    return plans


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
            for k, (start, end, first_line, digest) in enumerate(parts):
                tasks.append(replace(f, index=len(tasks), file_index=f.index, part=k,
                                     parts=len(parts), start=start, end=end,
                                     first_line=first_line, size=end - start,
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
