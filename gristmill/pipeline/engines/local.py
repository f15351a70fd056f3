"""The local engine: one process, or a process pool with ``workers: N``.

Work is cut into tasks (one per input file) and segments (stages between two
barriers, see ``execution.plan_segments``). Each (segment, task) writes its
output under ``OUTPUT/_work`` atomically and then a ``done`` marker; a resumed
run skips every task whose marker exists. Between segments rows are spilled
as Arrow IPC files, so a global stage sees the rows exactly as the earlier
stages left them and no stage is recomputed. Shuffle keys are spilled into
``shuffle_partitions`` files per task (``key % P``) and each partition is
reduced in a pool process (``workers > 1``), so a process holds one key
partition (corpus / P: raise ``shuffle_partitions`` with the corpus) and the
driver only the reduced tables (dedup: candidate pairs).

``_work`` lives in the output folder, so with an object-store output
(``s3://...``) the spills, markers and states are objects too and any worker
that can reach the store can run any task (see ``storage``); local outputs
read their spills memory-mapped.

Task order, not worker order, decides every output name, so ``workers: 1``
and ``workers: N`` write the same bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gristmill.pipeline import observe, storage
from gristmill.pipeline.carried_schema import load_plan
from gristmill.pipeline.droplists import drop_list_state
from gristmill.pipeline.execution import (
    Segment,
    TaskStats,
    partition_keys,
    plan_segments,
    run_segment_batch,
)
from gristmill.pipeline.inputs import InputReader, id_ledger_path
from gristmill.pipeline.readers import FileReport, InputTask
from gristmill.pipeline.recipe import Recipe
from gristmill.pipeline.rejects import RejectsWriter
from gristmill.pipeline.stage import DROPPED_SCHEMA, GlobalStage, ShuffleStage, Stage, merge_all
from gristmill.pipeline.storage import AtomicFile
from gristmill.pipeline.writers import ShardWriter, atomic_write_bytes


@dataclass
class TaskResult:
    """What one task produced across all segments (json-serializable)."""

    index: int
    file: dict[str, Any] = field(default_factory=dict)
    stats: TaskStats = field(default_factory=TaskStats)
    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects_file: str | None = None
    dropped_files: list[str] = field(default_factory=list)


@dataclass
class EngineResult:
    tasks: list[TaskResult]
    artifacts: dict[str, dict[str, bytes]]
    final_dir: Path
    #: the whole run's statistics, merged as task results came in (then every
    #: ``TaskResult.stats`` is empty): the driver holds one, not one per task
    stats: TaskStats | None = None


# ---------------------------------------------------------------------------
# per-process caches: stages are built and set up once per worker process

_STAGE_CACHE: dict[str, list[Stage]] = {}
_SETUP_DONE: set[tuple[str, str]] = set()
_STATE_CACHE: dict[str, Any] = {}


def _stages_for(recipe: Recipe, segment_index: int) -> tuple[Segment, list[Stage]]:
    key = recipe.stage_cache_key()
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = recipe.build_stages()
    stages = _STAGE_CACHE[key]
    segment = plan_segments(stages)[segment_index]
    for st in segment.rows + ([segment.exit] if segment.exit else []):
        if (key, st.name) not in _SETUP_DONE:
            st.setup()
            _SETUP_DONE.add((key, st.name))
    return segment, stages


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when the engine's process dies, even by
    ``kill -9`` (Linux ``PR_SET_PDEATHSIG``; elsewhere a thread that watches the
    parent pid)."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _load_state(path: Path) -> Any:
    # keyed by path and mtime: a later run into the same folder writes a new state file
    key = f"{path}:{storage.stat(path)['mtime_ns']}"
    if key not in _STATE_CACHE:
        with storage.open_read(path) as f:
            _STATE_CACHE[key] = pickle.load(f)
    return _STATE_CACHE[key]


class DroppedWriter:
    """Streams a task's dropped rows (``write_dropped``) into ``dropped.parquet``, a row
    group per ``group_rows`` rows, so memory does not grow with the input file."""

    def __init__(self, path: Path, group_rows: int = 65536) -> None:
        self.path, self.group_rows = path, group_rows
        self.pending: list[pa.Table] = []
        self.rows = 0
        self._sink: AtomicFile | None = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, tables: list[pa.Table]) -> None:
        self.pending += tables
        self.rows += sum(t.num_rows for t in tables)
        if self.rows >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self._writer is None:
            self._sink = AtomicFile(self.path)
            self._writer = pq.ParquetWriter(self._sink.file, DROPPED_SCHEMA, compression="zstd")
        self._writer.write_table(pa.concat_tables(self.pending).cast(DROPPED_SCHEMA),
                                 row_group_size=self.rows)
        self.pending, self.rows = [], 0

    def close(self) -> bool:
        """Write what is left; True if the file holds any row."""
        self._flush()
        if self._writer is None:
            return False
        self._writer.close()
        self._sink.commit()
        return True


def task_dir(work: Path, segment: int, task: int) -> Path:
    return work / f"seg{segment:02d}" / f"task-{task:05d}"


def _input_batches(recipe: Recipe, work: Path, segment: Segment, task: InputTask,
                   report: FileReport, stats: TaskStats, inputs: InputReader | None):
    if segment.index == 0:
        for batch in observe.timed_iter(iter(inputs), stats.timings, "read", "read"):
            stats.observe(batch, "in")
            yield batch
        return
    spill = task_dir(work, segment.index - 1, task.index) / "rows.arrow"
    if not spill.exists():
        return
    opened = (storage.open_read(spill) if storage.is_remote(spill)
              else pa.memory_map(str(spill)))
    with opened as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            with observe.clock(stats.timings, "spill", "read"):
                table = pa.Table.from_batches([reader.get_batch(i)])
            yield table


def run_task(recipe: Recipe, work: Path, segment_index: int, task: InputTask) -> dict[str, Any]:
    """Run one task through one segment; idempotent (skips when its marker exists).

    A write that fails (disk full, quota, permissions) is re-raised as an
    ``OSError`` that names the task's folder when the library that wrote did not
    name the file (Arrow's writers do not)."""
    try:
        return _run_task(recipe, work, segment_index, task)
    except OSError as e:
        if e.filename or not e.errno:
            raise
        raise OSError(e.errno, os.strerror(e.errno),
                      str(task_dir(work, segment_index, task.index))) from e


def _run_task(recipe: Recipe, work: Path, segment_index: int, task: InputTask) -> dict[str, Any]:
    out = task_dir(work, segment_index, task.index)
    marker = out / "done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    storage.remove_tree(out)  # leftovers of a killed attempt
    storage.mkdirs(out)
    segment, _ = _stages_for(recipe, segment_index)
    entry_state = None
    if segment.entry is not None:
        entry_state = _load_state(work / f"seg{segment.index - 1:02d}" / "state.pkl")
    report = FileReport(path=task.path, sink=RejectsWriter(out / "rejects.jsonl"))
    stats = TaskStats()
    dropped: list[pa.Table] | None = [] if recipe.output.write_dropped else None
    dropped_writer = DroppedWriter(out / "dropped.parquet") if dropped is not None else None
    summaries: list[Any] = []  # merged once at the end: a tree, not a fold per batch
    key_writers: list[tuple[AtomicFile, pa.ipc.RecordBatchStreamWriter] | None] = []
    shard_writer = None
    spill_writer = None
    spill_sink: AtomicFile | None = None
    P = recipe.engine.shuffle_partitions
    if segment.is_last:
        shard_writer = ShardWriter(out / "shards", recipe.output.format, recipe.output.shard_size)
    elif isinstance(segment.exit, ShuffleStage):
        key_writers = [None] * P
    rows_out = 0
    inputs = None
    if segment.index == 0:
        inputs = InputReader(task, recipe.sources[task.source_index], report,
                             recipe.engine.batch_size, id_ledger_path(work, task.index),
                             load_plan(work))
    for batch in _input_batches(recipe, work, segment, task, report, stats, inputs):
        batch = run_segment_batch(segment, batch, entry_state, stats, dropped)
        if dropped:
            dropped_writer.add(dropped)
            dropped.clear()
        if batch.num_rows == 0:
            continue
        rows_out += batch.num_rows
        if segment.is_last:
            stats.observe(batch, "out")
            shard_writer.write(batch)  # the writer times itself (ShardWriter.seconds)
            continue
        with observe.clock(stats.timings, "spill", "write"):
            if spill_writer is None:
                spill_sink = AtomicFile(out / "rows.arrow")
                spill_writer = pa.ipc.new_file(spill_sink.file, batch.schema)
            spill_writer.write_table(batch)
        if isinstance(segment.exit, GlobalStage):
            with observe.clock(stats.timings, segment.exit.name, "summarize"):
                summaries.append(segment.exit.summarize(batch))
            continue
        with observe.clock(stats.timings, segment.exit.name, "keys"):
            for p, part in enumerate(partition_keys(segment.exit.keys(batch), P)):
                if part.num_rows == 0:
                    continue
                if key_writers[p] is None:
                    sink = AtomicFile(out / f"keys-{p:04d}.arrow")
                    key_writers[p] = (sink, pa.ipc.new_stream(sink.file, part.schema))
                key_writers[p][1].write_table(part)
    result: dict[str, Any] = {"index": task.index, "rows_out": rows_out}
    if spill_writer is not None:
        spill_writer.close()
        spill_sink.commit()
    for pair in key_writers:
        if pair is not None:
            pair[1].close()
            pair[0].commit()
    if isinstance(segment.exit, GlobalStage):
        with observe.clock(stats.timings, segment.exit.name, "summarize"):
            summary = merge_all(segment.exit, summaries)
            if segment.exit.spills:
                if summary is not None:
                    with AtomicFile(out / "summary.spill") as sink:
                        segment.exit.spill_summary(summary, sink.file)
            else:
                atomic_write_bytes(out / "summary.pkl", pickle.dumps(summary))
    if shard_writer is not None:
        result["shards"] = [s.to_dict() for s in shard_writer.close()]
        observe.add_time(stats.timings, "write", "write", *shard_writer.seconds)
    if dropped_writer is not None and dropped_writer.close():
        result["dropped_file"] = str(out / "dropped.parquet")
    if segment.index == 0:
        report.flush_rejects()
        if report.sink.close():
            result["rejects_file"] = str(out / "rejects.jsonl")
        result["file"] = {**report.summary(), **inputs.fingerprint}
    result["stats"] = stats.to_json()
    # compact: the marker carries the task's samples, and indented JSON is the slow encoder
    atomic_write_bytes(marker, json.dumps(result, default=str).encode())
    return result


def reduce_partition(recipe: Recipe, work: Path, segment: int, task_indices: list[int],
                     partition: int, stage_name: str) -> Path | None:
    """Read key partition ``partition`` of every task's spill, reduce it and write the
    reduced table to ``segNN/reduced/part-PPPP.arrow``; returns that path (None when
    the partition reduced to nothing).

    Runs in a worker (pool process, Dask worker): the driver never holds a key
    partition, nor every partition's reduced table at once (``resolve_reduced``
    reads them back one at a time).
    """
    parts = []
    for t in task_indices:
        f = task_dir(work, segment, t) / f"keys-{partition:04d}.arrow"
        if f.exists():
            with storage.open_read(f) as src:
                parts.append(pa.ipc.open_stream(src).read_all())
    if not parts:
        return None
    stage = next(s for s in recipe.build_stages() if s.name == stage_name)
    reduced = stage.reduce(pa.concat_tables(parts))
    del parts
    if reduced is None or not reduced.num_rows:
        return None
    path = work / f"seg{segment:02d}" / "reduced" / f"part-{partition:04d}.arrow"
    storage.mkdirs(path.parent)
    with AtomicFile(path) as sink:
        with pa.ipc.new_stream(sink.file, reduced.schema) as writer:
            writer.write_table(reduced)
    return path


def resolve_reduced(stage: ShuffleStage, paths: list[Path | None]) -> Any:
    """``stage.resolve_parts`` over the reduced partitions ``reduce_partition`` wrote,
    read one at a time in partition order (dedup folds them as they come, so the
    driver holds one partition's table beside what it keeps)."""
    def tables() -> Iterator[pa.Table]:
        for p in paths:
            if p is not None:
                with storage.open_read(p) as src:
                    yield pa.ipc.open_stream(src).read_all()

    return stage.resolve_parts(tables())


def finalize_spilled(work: Path, segment: int, tasks: list[InputTask], stage: GlobalStage) -> Any:
    """``stage.finalize_spilled`` over the tasks' spilled summaries, in task order
    (a task that saw no row spilled none)."""
    paths = [task_dir(work, segment, t.index) / "summary.spill" for t in tasks]
    return stage.finalize_spilled([lambda p=p: storage.open_read(p)
                                   for p in paths if storage.exists(p)])


def finish_barrier(recipe: Recipe, work: Path, segment: Segment, tasks: list[InputTask],
                   stage: Stage, map_partitions: Callable[..., list[Any]] | None = None) -> Any:
    """Merge summaries (global) or reduce and resolve keys (shuffle); save the state.

    ``map_partitions(fn, args_list)`` runs ``reduce_partition`` for every key
    partition (in a process pool); without it they run here, one at a time."""
    seg_dir = work / f"seg{segment.index:02d}"
    state_path = seg_dir / "state.pkl"
    if state_path.exists():
        return _load_state(state_path)
    started = observe.start_clock()
    if isinstance(stage, GlobalStage) and stage.spills:
        state = finalize_spilled(work, segment.index, tasks, stage)
    elif isinstance(stage, GlobalStage):
        def load(t: InputTask) -> Any:
            with storage.open_read(task_dir(work, segment.index, t.index) / "summary.pkl") as f:
                return pickle.load(f)

        # loaded one at a time as the tree merge asks for them
        state = stage.finalize(merge_all(stage, (load(t) for t in tasks)))
    else:
        indices = [t.index for t in tasks]
        args = [(recipe, work, segment.index, indices, p, stage.name)
                for p in range(recipe.engine.shuffle_partitions)]
        paths = (map_partitions(reduce_partition, args) if map_partitions is not None
                 else [reduce_partition(*a) for a in args])  # partition order
        state = resolve_reduced(stage, paths)
        state = drop_list_state(stage, state, seg_dir / "drops")
    observe.save_barrier_time(work, stage.name, "barrier", started)
    atomic_write_bytes(state_path, pickle.dumps(state))
    return state


#: local files to plan below which the split planning pass stays in the driver
#: (``GRISTMILL_PLAN_POOL_BYTES`` overrides it; 0 always uses the pool)
POOL_PLAN_BYTES = 4 << 30


class LocalEngine:
    """Runs every segment's tasks in this process or in a spawn-started pool."""

    name = "local"

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress

    def _map(self, segment_index: int, tasks: list[InputTask], work: Path, desc: str,
             consume: Callable[[int, dict[str, Any]], None]) -> None:
        """Run the segment's tasks; ``consume(position, result)`` takes each task's
        result as it arrives (nothing is held here until the segment ends)."""
        workers = min(self.recipe.engine.workers, max(len(tasks), 1))
        total_bytes = sum(t.size for t in tasks) if segment_index == 0 else 0
        bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not self.progress,
                   dynamic_ncols=True)
        start = time.monotonic()
        rows = 0
        done_bytes = 0
        position = {t.index: i for i, t in enumerate(tasks)}

        def tick(t: InputTask, res: dict[str, Any]) -> None:
            nonlocal rows, done_bytes
            rows += res.get("file", {}).get("records", res["rows_out"])
            done_bytes += t.size if segment_index == 0 else 0
            el = max(time.monotonic() - start, 1e-9)
            post = {"rec/s": f"{rows / el:,.0f}"}
            if total_bytes:
                post["MB/s"] = f"{done_bytes / el / 1e6:,.1f}"
            bar.set_postfix(post)
            bar.update(1)
            consume(position[t.index], res)

        if workers <= 1:
            for t in tasks:
                tick(t, run_task(self.recipe, work, segment_index, t))
        else:
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent,
                                        initargs=(os.getpid(),)) as pool:
                futs = {pool.submit(run_task, self.recipe, work, segment_index, t): t
                        for t in tasks}
                for fut in cf.as_completed(futs):
                    tick(futs.pop(fut), fut.result())
        bar.close()

    def _map_partitions(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        """``fn(*a)`` for every ``a``, in a pool of ``workers`` processes; results in order.

        With ``workers > 1`` even a single partition is reduced in a pool process,
        so the driver never holds a key partition."""
        if self.recipe.engine.workers <= 1 or not args:
            return [fn(*a) for a in args]
        workers = min(self.recipe.engine.workers, len(args))
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent,
                                    initargs=(os.getpid(),)) as pool:
            return list(pool.map(fn, *zip(*args, strict=True)))

    def map_files(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        """The split planning pass (``splits.plan_splits``): ``fn(*a)``, one file per
        ``a`` (a path first), in a pool of ``workers`` processes; results in order.

        Here instead, in this process, for one file, ``workers: 1``, or local files
        of less than ``POOL_PLAN_BYTES`` together (``GRISTMILL_PLAN_POOL_BYTES``):
        planning reads local files at ~1.6 GB/s, and starting the pool costs more
        than that saves below a few GB (``bench_split.py --planning``: 4 x 250 MB
        planned in 0.53 s here against 0.93 s in a pool of 2, of which 0.74 s was
        the pool's start)."""
        paths = [a[0] for a in args]
        least = int(os.environ.get("GRISTMILL_PLAN_POOL_BYTES", POOL_PLAN_BYTES))
        if len(args) <= 1 or self.recipe.engine.workers <= 1 or (
                not any(storage.is_remote(p) for p in paths)
                and sum(storage.size(storage.as_path(p)) for p in paths) < least):
            return [fn(*a) for a in args]
        return self._map_partitions(fn, args)

    def execute(self, tasks: list[InputTask], work: Path) -> EngineResult:
        _STATE_CACHE.clear()  # states of an earlier run in this process are never reused
        return execute_segments(
            self.recipe, tasks, work,
            map_tasks=lambda seg, desc, consume: self._map(seg.index, tasks, work, desc,
                                                           consume),
            barrier=lambda seg, stage: finish_barrier(self.recipe, work, seg, tasks, stage,
                                                      self._map_partitions))


def execute_segments(recipe: Recipe, tasks: list[InputTask], work: Path,
                     map_tasks: Callable[[Segment, str, Callable[[int, dict[str, Any]], None]],
                                         None],
                     barrier: Callable[[Segment, Stage], Any], prefix: str = "") -> EngineResult:
    """The segment loop every file-task engine shares.

    ``map_tasks(segment, description, consume)`` runs ``run_task`` for every task
    of the segment (in a process pool, on a Dask cluster...) and hands each
    result to ``consume(position in tasks, result)`` as it arrives, in any
    order: its statistics are merged into the run's at once (the merges do not
    depend on the order) and only the small per-file fields are kept, so the
    driver never holds every task's samples. ``barrier(segment, stage)`` merges
    or reduces the segment's exit stage and returns its state.
    """
    stages = recipe.build_stages()
    segments = plan_segments(stages)
    per_task = [TaskResult(index=t.index) for t in tasks]
    run_stats = TaskStats()
    artifacts: dict[str, dict[str, bytes]] = {}
    for seg in segments:
        names = [s.name for s in seg.stages] + ([seg.exit.name] if seg.exit else [])
        desc = f"{prefix}segment {seg.index + 1}/{len(segments)} [{', '.join(names) or 'write'}]"

        def consume(position: int, res: dict[str, Any], seg: Segment = seg) -> None:
            tr = per_task[position]
            # samples and value samples are per task: merged now, never kept per task
            run_stats.merge(TaskStats.from_json(res.pop("stats")))
            if seg.index == 0:
                tr.file = res.get("file", {})
                tr.rejects_file = res.get("rejects_file")
            if res.get("dropped_file"):
                tr.dropped_files.append(res["dropped_file"])
            if seg.is_last:
                tr.shards = res.get("shards", [])

        map_tasks(seg, desc, consume)
        if seg.exit is not None:
            exit_stage = next(s for s in stages if s.name == seg.exit.name)
            state = barrier(seg, exit_stage)
            files = exit_stage.artifacts(state)
            if files:
                artifacts[exit_stage.name] = files
    return EngineResult(tasks=per_task, artifacts=artifacts,
                        final_dir=work / f"seg{len(segments) - 1:02d}", stats=run_stats)
