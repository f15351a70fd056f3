"""What a run knows about its input files: fingerprints, changes, repeated ids.

Fingerprints
    Every input file is recorded with its size, modification time (ns) and an
    ``xxh3_128`` hash of its bytes (xxHash3, 128 bits: a fast non-cryptographic
    hash, enough to notice a changed file, not to resist a forger). Size and
    mtime are taken when the run lists its inputs (``_work/run.json``); the hash
    is computed by the task that reads the file, from the raw bytes as the
    reader reads them (JSONL, compressed or not: the file is read once, which
    matters for an object in S3; a Parquet object in an object store is
    downloaded once to a local temporary file, hashed on the way, and read
    there), or by reading it again (a local Parquet file, read by ranges, or a
    file the reader stopped reading at a fault), or by the split plan (a file
    read by several tasks, see ``splits``), and lands in the manifest. On an
    object store the modification time is the object's last-modified time.
    A resume or re-run compares the inputs it finds with the recorded ones and
    refuses (``InputsChanged``, exit 2) naming every added, removed or changed
    file, unless ``--fresh``. A file whose mtime moved but whose size and hash
    are unchanged (``touch``) is not a change.

Repeated ids
    The user's ``id`` is data, never identity (see ``stage.ROW_KEY``). A
    reader task writes the ids it read, with their row keys, to a small
    Parquet "id ledger", sorted by a 12-bit hash bucket of the id; at commit
    the buckets are cut into as many partitions as the corpus needs
    (``LEDGER_ROWS_PER_PARTITION`` ids each) and counted one partition at a
    time, so the memory the count takes does not grow with the corpus. The
    manifest reports how many ids repeat, how many records carry them and the
    first examples (smallest row keys) with their files and lines; none of it
    depends on the partition count.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from gristmill.pipeline import storage
from gristmill.pipeline.carried_schema import CarriedPlan, conform
from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import RecipeError, SourceSpec
from gristmill.pipeline.stage import KEY_POS_BITS, KEY_POS_MASK, ROW_KEY
from gristmill.pipeline.storage import AtomicFile

HASH_NAME = "xxh3_128"
ID_BUCKETS = 4096  # hash buckets written into every ledger
LEDGER_ROWS_PER_PARTITION = 8_192  # ids counted at once at commit
LEDGER_ROW_GROUP = 4_096
#: how the repeated-id count reads ledgers: one thread, no pre-buffering. With Arrow's
#: defaults (reader threads, pre-buffering) the driver's peak grew with the number of
#: ledgers read; without them it is the Parquet reader's and group_by's fixed cost
#: (``benchmarks/ledger_memory.py`` runs both)
LEDGER_READ = {"pre_buffer": False, "use_threads": False}
MAX_EXAMPLES = 10


class InputsChanged(RecipeError):
    """Inputs differ from the ones a partial or finished run recorded."""


class InputChangedDuringRun(RuntimeError):
    """An input file changed while a task was reading it."""


def stat_file(path: str | Path) -> dict[str, int]:
    """Size and mtime (ns) of a local file or an object (its last-modified time)."""
    return storage.stat(path)


def hash_file(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with storage.open_read(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def listing(tasks: list[InputTask]) -> list[dict[str, Any]]:
    """The inputs of a run as recorded in ``_work/run.json``: path, size, mtime."""
    return [{"path": t.path, **stat_file(t.path)} for t in tasks]


def input_changes(recorded: list[dict[str, Any]], tasks: list[InputTask],
                  check_hash: bool = False) -> list[str]:
    """Human-readable differences between recorded inputs and the current ones.

    With ``check_hash`` a file whose size is unchanged but whose mtime moved is
    hashed and compared with the recorded ``xxh3_128`` (where one was recorded).
    """
    old = {r["path"]: r for r in recorded}
    new = {t.path: t for t in tasks}
    changes = [f"removed: {p}" for p in old if p not in new]
    changes += [f"added: {p}" for p in new if p not in old]
    for path in old.keys() & new.keys():
        r, now = old[path], stat_file(path)
        if now["size"] != r.get("size"):
            changes.append(f"changed: {path} (size {r.get('size')} -> {now['size']} bytes)")
        elif now["mtime_ns"] != r.get("mtime_ns"):
            if check_hash and r.get(HASH_NAME):
                if hash_file(path) != r[HASH_NAME]:
                    changes.append(f"changed: {path} (same size, different content)")
            else:
                changes.append(f"changed: {path} (modified since it was read)")
    return sorted(changes)


def refuse_changed_inputs(changes: list[str], out: Path, what: str) -> None:
    if changes:
        listed = "\n  ".join(changes[:20])
        more = f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else ""
        raise InputsChanged(
            f"inputs changed since the {what} in {out} was made:\n  {listed}{more}\n"
            f"Run with --fresh to start over on the current inputs")


class _TapHash:
    """xxh3_128 (or another xxHash) of the bytes handed to it, and how many there were."""

    def __init__(self, algorithm: Any = xxhash.xxh3_128) -> None:
        self._h = algorithm()
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class InputReader:
    """Read one input file as canonical batches, and on the side: write its id
    ledger, check that the file did not change while it was read, and hash it.

    After iteration ``fingerprint`` holds size, mtime_ns and ``xxh3_128``.
    """

    def __init__(self, task: InputTask, spec: SourceSpec, report: FileReport,
                 batch_size: int, ledger: Path | None, plan: CarriedPlan | None = None) -> None:
        self.task, self.spec, self.report = task, spec, report
        self.batch_size = batch_size
        self.ledger_path = ledger
        self.plan = plan  # the run's one type per carried column (``carried_schema``)
        self.fingerprint: dict[str, Any] = {}

    def __iter__(self) -> Iterator[pa.Table]:
        # a vanished or unreadable (permissions) input is a fault of the machine, not
        # bad data: it stops the run with one line (exit 1), and the run resumes once
        # the cause is fixed; an input that opens but cannot be parsed is a reject
        task = self.task
        before = stat_file(task.path)
        planned = task.planned
        if planned is not None and (before["size"], before["mtime_ns"]) != (
                planned["size"], planned["mtime_ns"]):
            raise InputChangedDuringRun(
                f"input {task.path} changed after the run split it into {task.parts} tasks "
                f"(size {planned['size']} -> {before['size']} bytes, mtime_ns "
                f"{planned['mtime_ns']} -> {before['mtime_ns']}); rerun when the input is stable")
        with storage.open_read(task.path):
            pass
        ids: list[pa.Table] = []
        # a piece of a split JSONL file hashes its own range against the plan's hash
        tapped = _TapHash(xxhash.xxh3_64 if planned is not None else xxhash.xxh3_128)
        with self._one_download(tapped) as local_copy:
            for batch in read_task(task, self.spec, self.report, self.batch_size, tapped,
                                   local_copy):
                if self.plan is not None:
                    # before the ledger: a row the conversion rejects is not in it
                    batch = conform(batch, self.plan, self.report)
                    if not batch.num_rows:
                        continue
                if self.ledger_path is not None:
                    ids.append(batch.select(["id", ROW_KEY]))
                yield batch
        after = stat_file(task.path)
        if after != before:
            raise InputChangedDuringRun(
                f"input {task.path} changed while it was read (size {before['size']} -> "
                f"{after['size']}); rerun when the input is stable")
        if planned is not None:
            if task.format == "jsonl" and (tapped.size != task.end - task.start
                                           or tapped.hexdigest() != planned.get("range_xxh3_64")):
                raise InputChangedDuringRun(
                    f"input {task.path} changed after the run split it: bytes {task.start}.."
                    f"{task.end} differ from the planned ones; rerun when the input is stable")
            digest = planned[HASH_NAME]  # the planning pass hashed the whole file
        else:
            # the bytes hashed as they were read, when the reader read all of them in
            # order (JSONL; a Parquet object downloaded once); else (a local Parquet
            # file, a file that ended in a fault) read again to hash it
            digest = tapped.hexdigest() if tapped.size == after["size"] else \
                hash_file(task.path)
        self.fingerprint = {**after, HASH_NAME: digest}
        if self.ledger_path is not None:
            write_id_ledger(self.ledger_path, ids)

    @contextlib.contextmanager
    def _one_download(self, tap: _TapHash) -> Iterator[str | None]:
        """A whole Parquet object on an object store is downloaded once, to a local
        temporary file, hashed on the way; the reader reads that file (pyarrow's
        ranged reads and a second download to hash it would read it twice). Yields
        None for everything else (read where it is)."""
        task = self.task
        if task.format != "parquet" or task.planned is not None or \
                not storage.is_remote(task.path):
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="gristmill-input-") as folder:
            local = os.path.join(folder, "input.parquet")
            with storage.open_read(task.path) as src, open(local, "wb") as dst:
                while chunk := src.read(8 << 20):
                    tap(chunk)
                    dst.write(chunk)
            yield local


def id_ledger_path(work: Path, task_index: int) -> Path:
    """Where the reader task of input ``task_index`` writes its id ledger (any engine)."""
    return storage.as_path(work) / "ids" / f"task-{task_index:05d}.parquet"


def _id_bucket(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Bucket of every id: ``mix64(sum_i mix64(byte_i | i << 8) ^ length) %
    ID_BUCKETS`` over the id's UTF-8 bytes, computed with numpy on the Arrow
    buffers. A pure function of the bytes, so it is the same in every
    process, engine and library version."""
    from gristmill.pipeline.hashing import mix64

    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    if n == 0:
        return pa.array([], pa.uint16())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] else \
        np.zeros(0, np.uint8)
    start, end = offsets[0], offsets[-1]
    body = data[start:end].astype(np.uint64)
    lengths = np.diff(offsets)
    pos = np.arange(body.size, dtype=np.uint64) - np.repeat(
        (offsets[:-1] - start).astype(np.uint64), lengths)
    with np.errstate(over="ignore"):
        # a random 64-bit value per (byte, position), summed: collisions of two ids
        # need their sums to collide, not merely equal weighted byte sums
        terms = mix64(body | (pos << np.uint64(8)), seed=0, salt="id_byte")
        sums = np.zeros(n, dtype=np.uint64)
        nonempty = lengths > 0
        if body.size:
            sums[nonempty] = np.add.reduceat(terms, (offsets[:-1] - start)[nonempty])
        h = mix64(sums ^ lengths.astype(np.uint64), seed=0, salt="id_ledger")
    return pa.array((h % np.uint64(ID_BUCKETS)).astype(np.uint16), pa.uint16())


def write_id_ledger(path: Path, tables: list[pa.Table]) -> None:
    """(bucket, id, row key) of every record read, sorted by bucket, in row groups of
    ``LEDGER_ROW_GROUP`` rows whose bucket statistics let the count read only the
    groups of one partition."""
    schema = pa.schema([("part", pa.uint16()), ("id", pa.string()), (ROW_KEY, pa.uint64())])
    if tables:
        t = pa.concat_tables(tables).combine_chunks()
        t = pa.Table.from_arrays([_id_bucket(t.column("id")), t.column("id"),
                                  t.column(ROW_KEY)], schema=schema).sort_by("part")
    else:
        t = schema.empty_table()
    with AtomicFile(path) as sink, pq.ParquetWriter(sink.file, schema, compression="zstd") as w:
        if t.num_rows:
            w.write_table(t, row_group_size=LEDGER_ROW_GROUP)


def _bucket_ranges(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """Rows of one ledger and the (min, max) bucket of each of its row groups."""
    with storage.open_read(path) as f:
        meta = pq.ParquetFile(f).metadata
    ranges = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(0).statistics
        if st is None or not st.has_min_max:
            ranges.append((0, ID_BUCKETS - 1))
        else:
            ranges.append((int(st.min), int(st.max)))
    return meta.num_rows, ranges


def _read_partition(ledgers: list[tuple[Path, list[tuple[int, int]]]], lo: int,
                    hi: int) -> pa.Table:
    """(id, row key) of buckets ``lo <= b < hi`` of every ledger, read with pyarrow (local
    files and objects alike; no polars, whose import alone costs a run 0.2 CPU s)."""
    schema = pa.schema([("id", pa.string()), (ROW_KEY, pa.uint64())])
    tables = []
    for path, ranges in ledgers:
        groups = [g for g, (a, b) in enumerate(ranges) if a < hi and b >= lo]
        if not groups:
            continue
        with storage.open_read(path) as f:
            t = pq.ParquetFile(f, pre_buffer=LEDGER_READ["pre_buffer"]).read_row_groups(
                groups, columns=["part", "id", ROW_KEY], use_threads=LEDGER_READ["use_threads"])
        part = t.column("part")
        t = t.filter(pc.and_(pc.greater_equal(part, lo), pc.less(part, hi)))
        tables.append(t.select(["id", ROW_KEY]).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _smallest_keys(part: pa.Table, ids: list[str], k: int) -> dict[str, list[int]]:
    """The ``k`` smallest row keys of each of ``ids`` (a few ids) in ``part``."""
    sub = part.filter(pc.is_in(part.column("id"), value_set=pa.array(ids, pa.string())))
    out = {}
    for i in ids:
        keys = sub.column(ROW_KEY).filter(pc.equal(sub.column("id"), i))
        out[i] = sorted(keys.take(pc.bottom_k_unstable(keys, k)).to_pylist())
    return out


def repeated_ids(ledgers: list[Path], file_labels: dict[int, str]) -> dict[str, Any]:
    """Count ids that occur on more than one record, one partition of buckets at a time.

    The partition count is ``ceil(ledger rows / LEDGER_ROWS_PER_PARTITION)`` (at most
    ``ID_BUCKETS``), so one partition holds a bounded number of ids whatever the corpus
    size; the counts and examples are the same for any partition count."""
    ledgers = [p for p in ledgers if p.exists()]
    total_ids = repeated = records = 0
    examples: list[dict[str, Any]] = []
    if not ledgers:
        return {"distinct_ids": 0, "repeated_ids": 0, "records_with_repeated_id": 0,
                "examples": []}
    located, rows = [], 0
    for path in ledgers:
        n, ranges = _bucket_ranges(path)
        rows += n
        located.append((path, ranges))
    parts = min(ID_BUCKETS, max(1, -(-rows // LEDGER_ROWS_PER_PARTITION)))
    for p in range(parts):
        part = _read_partition(located, p * ID_BUCKETS // parts, (p + 1) * ID_BUCKETS // parts)
        counts = part.group_by("id", use_threads=False).aggregate(
            [(ROW_KEY, "count"), (ROW_KEY, "min")])
        total_ids += counts.num_rows
        dup = counts.filter(pc.greater(counts.column(f"{ROW_KEY}_count"), 1))
        repeated += dup.num_rows
        records += int(pc.sum(dup.column(f"{ROW_KEY}_count")).as_py() or 0)
        if dup.num_rows:
            # the first examples of the whole corpus: this partition's first few, merged
            # with the ones kept so far, whatever order the partitions come in
            head = dup.sort_by(f"{ROW_KEY}_min").slice(0, MAX_EXAMPLES).to_pylist()
            smallest = _smallest_keys(part, [r["id"] for r in head], 3)
            for row in head:
                examples.append({"id": row["id"][:200], "count": row[f"{ROW_KEY}_count"], "at": [
                    f"{file_labels.get(k >> KEY_POS_BITS, '?')}:{k & KEY_POS_MASK}"
                    for k in smallest[row["id"]]], "first": row[f"{ROW_KEY}_min"]})
            examples = sorted(examples, key=lambda e: e["first"])[:MAX_EXAMPLES]
    for e in examples:
        del e["first"]
    return {"distinct_ids": total_ids, "repeated_ids": repeated,
            "records_with_repeated_id": records, "examples": examples}
