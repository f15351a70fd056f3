"""The Beam engine: the recipe as one Apache Beam pipeline, running the same stages.

The graph, for stages ``row... | barrier | row... | ...``::

    List input files (Create of file tasks, not records)
      -> Read files and run segment 0          ParDo: readers + row stages
      -> [global]  Summarize -> CombineGlobally(merge) -> Finalize      (side input)
         [shuffle] Key -> GroupByKey(key % P) -> Reduce -> CombineGlobally(concat)
                   -> Resolve                                          (side input)
      -> Run segment 1 with the state          ParDo: barrier.apply + row stages
      -> ...
      -> Write shards per input file           CoGroupByKey(rows, audit) by file

Elements are ``(file index, batch number, Arrow table)``: batches keep their
file and order, so each file's shards hold the same rows, in the same order,
as the local engine writes. Counts, dropped rows and rejects travel beside the
rows as an ``audit`` output and are written with the shards. Readers, writers,
stage execution and the manifest are the local engine's.

Runners (``engine.runner``): by default Beam's ``FnApiRunner`` in this process,
or with ``engine.workers: N`` in ``N`` worker processes
(``direct_running_mode=multi_processing``); ``bundle_based`` for the
``BundleBasedDirectRunner``; any other name (``FlinkRunner``, ``SparkRunner``,
``DataflowRunner``, ``PortableRunner``) is handed to Beam with
``engine.beam_options`` as ``PipelineOptions``. Beam's default runner is never
chosen implicitly (it downloads a runner binary). Workers write shards and
audits under ``OUTPUT/_work``, so a distributed runner needs the output on
storage every worker reaches: an object store (``output.path: s3://...``,
credentials from each worker's environment) or a shared filesystem at the
same path.

Resume. Each barrier's state is saved (``_work/segNN/state.pkl``) and each
input file's result (``_work/beam/task-NNNNN.json``, after its shards) when
done. A killed run started again loads the saved states instead of computing
them, and reads and runs only the files without a result; once one file is
written every barrier state is saved, so from then on a resume is file by
file. The run says on stderr what it reuses, or that it starts over (killed
before its first barrier finished), before the pipeline starts.
"""

from __future__ import annotations

import json
import pickle
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gristmill.pipeline import observe, storage
from gristmill.pipeline.carried_schema import load_plan
from gristmill.pipeline.droplists import drop_list_state
from gristmill.pipeline.engines.local import EngineResult, TaskResult, task_dir
from gristmill.pipeline.execution import (
    Segment,
    TaskStats,
    partition_keys,
    plan_segments,
    run_segment_batch,
)
from gristmill.pipeline.inputs import InputReader, id_ledger_path
from gristmill.pipeline.readers import FileReport, InputTask
from gristmill.pipeline.recipe import Recipe, RecipeError
from gristmill.pipeline.rejects import RejectsWriter
from gristmill.pipeline.stage import DROPPED_SCHEMA, GlobalStage, Stage, merge_all
from gristmill.pipeline.writers import (
    AtomicFile,
    ShardWriter,
    atomic_write_bytes,
    atomic_write_json,
)

LOCAL_RUNNERS = ("fn_api", "bundle_based")


def _segment_stages(recipe: Recipe, index: int) -> tuple[Segment, list[Stage]]:
    stages = recipe.build_stages()
    segment = plan_segments(stages)[index]
    for st in segment.rows + ([segment.exit] if segment.exit else []):
        st.setup()
    if segment.entry is not None:
        segment.entry.setup()
    return segment, stages


def _audit(segment: int, stats: TaskStats, dropped: list[pa.Table] | None,
           report: FileReport | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"segment": segment, "stats": stats.to_json(), "dropped": None}
    if dropped:
        out["dropped"] = pa.concat_tables(dropped).cast(DROPPED_SCHEMA)
    if report is not None:
        # the rejects themselves were streamed to the task's rejects file as read
        report.flush_rejects()
        out["file"] = report.summary()
        out["rejects_file"] = str(report.sink.path) if report.sink.close() else None
    return out


def _build_pipeline(beam, p, recipe: Recipe, tasks: list[InputTask], work: Path,
                    saved: frozenset[int] = frozenset()):
    """Add the recipe's transforms to pipeline ``p``; returns the per-file results.

    ``saved``: barriers (segment indices) whose state a killed run already saved;
    it is loaded instead of computed again."""
    from apache_beam import pvalue

    class ReadAndRunFirstSegment(beam.DoFn):
        def __init__(self, recipe: Recipe) -> None:
            self.recipe = recipe

        def setup(self) -> None:
            self.segment, _ = _segment_stages(self.recipe, 0)

        def process(self, task_fields: dict[str, Any]):
            task = InputTask(**task_fields)
            spec = self.recipe.sources[task.source_index]
            report = FileReport(path=task.path, sink=RejectsWriter(
                task_dir(work, 0, task.index) / "rejects.jsonl"))
            stats = TaskStats()
            dropped: list[pa.Table] | None = [] if self.recipe.output.write_dropped else None
            inputs = InputReader(task, spec, report, self.recipe.engine.batch_size,
                                 id_ledger_path(work, task.index), load_plan(work))
            batches = observe.timed_iter(iter(inputs), stats.timings, "read", "read")
            for seq, batch in enumerate(batches):
                stats.observe(batch, "in")
                kept = run_segment_batch(self.segment, batch, None, stats, dropped)
                if kept.num_rows:
                    yield (task.index, seq, kept)
            audit = _audit(0, stats, dropped, report)
            audit["file"].update(inputs.fingerprint)
            yield pvalue.TaggedOutput("audit", (task.index, audit))

    class RunSegment(beam.DoFn):
        def __init__(self, recipe: Recipe, index: int) -> None:
            self.recipe, self.index = recipe, index

        def setup(self) -> None:
            self.segment, _ = _segment_stages(self.recipe, self.index)

        def process(self, element: tuple[int, int, pa.Table], state: Any):
            task, seq, batch = element
            stats = TaskStats()
            dropped: list[pa.Table] | None = [] if self.recipe.output.write_dropped else None
            kept = run_segment_batch(self.segment, batch, state, stats, dropped)
            if kept.num_rows:
                yield (task, seq, kept)
            yield pvalue.TaggedOutput("audit", (task, _audit(self.index, stats, dropped)))

    class TimedDoFn(beam.DoFn):
        """Adds up the time of a barrier's per-batch step and saves it per bundle."""

        phase = ""

        def start_bundle(self) -> None:
            self.timings: dict = {}

        def finish_bundle(self) -> None:
            for phase, (wall, cpu) in self.timings.get(self.stage.name, {}).items():
                observe.save_time(work, self.stage.name, phase, wall, cpu)

    class Summarize(TimedDoFn):
        def __init__(self, recipe: Recipe, index: int) -> None:
            self.recipe, self.index = recipe, index

        def setup(self) -> None:
            self.stage = _segment_stages(self.recipe, self.index)[0].exit

        def process(self, element: tuple[int, int, pa.Table]):
            with observe.clock(self.timings, self.stage.name, "summarize"):
                summary = self.stage.summarize(element[2])
            yield summary

    class SummarizeByFile(Summarize):
        def process(self, element: tuple[int, int, pa.Table]):
            for summary in super().process(element):
                yield (element[0], (element[1], summary))

    class SpillSummary(TimedDoFn):
        """A spilling stage's summaries of one task's batches, merged in batch order
        and written to the task's file: one file per task, as the local engine
        writes (a sketch of the task is then the same on both)."""

        def __init__(self, recipe: Recipe, index: int) -> None:
            self.recipe, self.index = recipe, index

        def setup(self) -> None:
            self.stage = _segment_stages(self.recipe, self.index)[0].exit

        def process(self, element: tuple[int, Any]):
            task, parts = element
            with observe.clock(self.timings, self.stage.name, "summarize"):
                summary = merge_all(self.stage, (s for _, s in sorted(parts, key=lambda e: e[0])))
                if summary is None:
                    return
                with AtomicFile(_spill_path(work, self.index, task)) as sink:
                    self.stage.spill_summary(summary, sink.file)
            yield task

    def finalize_spills(spills: list[int], stage: GlobalStage, index: int) -> Any:
        # task order: the order the local engine merges in
        paths = [_spill_path(work, index, t) for t in sorted(spills)]
        return stage.finalize_spilled([lambda p=p: storage.open_read(p) for p in paths])

    class MergeSummaries(beam.CombineFn):
        """merge() is associative and commutative, so any combine tree is fine."""

        def __init__(self, stage: GlobalStage) -> None:
            self.stage = stage

        def create_accumulator(self) -> Any:
            return None

        def add_input(self, acc: Any, summary: Any) -> Any:
            if summary is None:
                return acc
            return summary if acc is None else self.stage.merge(acc, summary)

        def merge_accumulators(self, accs) -> Any:
            out = None
            for a in accs:
                out = self.add_input(out, a)
            return out

        def extract_output(self, acc: Any) -> Any:
            return acc

    class KeyByPartition(TimedDoFn):
        def __init__(self, recipe: Recipe, index: int) -> None:
            self.recipe, self.index = recipe, index

        def setup(self) -> None:
            self.stage = _segment_stages(self.recipe, self.index)[0].exit

        def process(self, element: tuple[int, int, pa.Table]):
            with observe.clock(self.timings, self.stage.name, "keys"):
                keys = self.stage.keys(element[2])
                parts = partition_keys(keys, self.recipe.engine.shuffle_partitions)
            for p, part in enumerate(parts):
                if part.num_rows:
                    yield (p, part)

    class PartitionTables(beam.CombineFn):
        def create_accumulator(self) -> list:
            return []

        def add_input(self, acc: list, element: tuple[int, pa.Table | None]) -> list:
            if element[1] is not None and element[1].num_rows:
                acc.append(element)
            return acc

        def merge_accumulators(self, accs) -> list:
            return [t for a in accs for t in a]

        def extract_output(self, acc: list) -> list[pa.Table]:
            # partition order, as the local engine resolves them: never the bundling order
            return [t for _, t in sorted(acc, key=lambda e: e[0])]

    def timed(fn, stage_name: str):
        """``fn`` with its time saved as the stage's barrier time."""
        def run(*args):
            started = observe.start_clock()
            out = fn(*args)
            observe.save_barrier_time(work, stage_name, "barrier", started)
            return out
        return run

    def save_state(state: Any, index: int) -> Any:
        atomic_write_bytes(_state_path(work, index), pickle.dumps(state))
        return state

    def load_state(index: int) -> Any:
        with storage.open_read(_state_path(work, index)) as f:
            return pickle.load(f)

    class WriteFile(beam.DoFn):
        """All rows and audits of one input file: shards, dropped, rejects, result."""

        def __init__(self, recipe: Recipe, last: int) -> None:
            self.recipe, self.last = recipe, last

        def process(self, element: tuple[int, dict[str, list]]):
            index, groups = element
            stats = TaskStats()
            result: dict[str, Any] = {"index": index, "dropped_files": []}
            dropped_by_segment: dict[int, list[pa.Table]] = {}
            for audit in sorted(groups["audit"], key=lambda a: a["segment"]):
                stats.merge(TaskStats.from_json(audit["stats"]))
                if audit["dropped"] is not None:
                    dropped_by_segment.setdefault(audit["segment"], []).append(audit["dropped"])
                if "file" in audit:
                    result["file"] = audit["file"]
                    if audit["rejects_file"]:
                        result["rejects_file"] = audit["rejects_file"]
            for seg, tables in sorted(dropped_by_segment.items()):
                table = pa.concat_tables(tables)
                # the row order of drops is the batch order, as the local engine writes it
                path = task_dir(work, seg, index) / "dropped.parquet"
                with AtomicFile(path) as sink:
                    pq.write_table(table, sink.file, compression="zstd")
                result["dropped_files"].append(str(path))
            writer = ShardWriter(task_dir(work, self.last, index) / "shards",
                                 self.recipe.output.format, self.recipe.output.shard_size)
            for _, batch in sorted(groups["rows"], key=lambda r: r[0]):
                stats.observe(batch, "out")
                writer.write(batch)  # the writer times itself (ShardWriter.seconds)
            result["shards"] = [s.to_dict() for s in writer.close()]
            observe.add_time(stats.timings, "write", "write", *writer.seconds)
            result["stats"] = stats.to_json()
            atomic_write_json(work / "beam" / f"task-{index:05d}.json", result)
            yield index

    stages = recipe.build_stages()
    segments = plan_segments(stages)
    task_fields = [asdict(t) for t in tasks]
    first = (p | "List input files" >> beam.Create(task_fields)
             | "Read files and run segment 0" >> beam.ParDo(
                 ReadAndRunFirstSegment(recipe)).with_outputs("audit", main="rows"))
    rows = first.rows
    audits = [first.audit]
    for seg in segments[:-1]:
        i, stage = seg.index, seg.exit
        if i in saved:
            state = (p | f"Saved state of {stage.name}" >> beam.Create([i])
                     | f"Load state of {stage.name}" >> beam.Map(load_state))
        elif isinstance(stage, GlobalStage) and stage.spills:
            state = (rows | f"Summarize for {stage.name}" >> beam.ParDo(SummarizeByFile(recipe, i))
                     | f"Group summaries of {stage.name} by file" >> beam.GroupByKey()
                     | f"Spill summaries for {stage.name}" >> beam.ParDo(SpillSummary(recipe, i))
                     | f"List spilled summaries of {stage.name}" >> beam.combiners.ToList()
                     | f"Finalize {stage.name}" >> beam.Map(timed(
                         lambda spills, st=stage, i=i: finalize_spills(spills, st, i),
                         stage.name)))
        elif isinstance(stage, GlobalStage):
            state = (rows | f"Summarize for {stage.name}" >> beam.ParDo(Summarize(recipe, i))
                     | f"Merge summaries of {stage.name}" >> beam.CombineGlobally(
                         MergeSummaries(stage))
                     | f"Finalize {stage.name}" >> beam.Map(timed(stage.finalize, stage.name)))
        else:
            state = (rows | f"Key rows for {stage.name}" >> beam.ParDo(KeyByPartition(recipe, i))
                     | f"Group keys of {stage.name}" >> beam.GroupByKey()
                     | f"Reduce groups of {stage.name}" >> beam.MapTuple(timed(
                         lambda part, tables, st=stage: (
                             part, st.reduce(pa.concat_tables(list(tables)))), stage.name))
                     | f"Gather edges of {stage.name}" >> beam.CombineGlobally(PartitionTables())
                     | f"Resolve {stage.name}" >> beam.Map(timed(
                         lambda parts, st=stage, i=i: drop_list_state(
                             st, st.resolve_parts(parts), work / f"seg{i:02d}" / "drops"),
                         stage.name)))
        if i not in saved:
            state = state | f"Save state of {stage.name}" >> beam.Map(save_state, i)
        out = (rows | f"Run segment {i + 1}" >> beam.ParDo(
            RunSegment(recipe, i + 1), state=pvalue.AsSingleton(state)).with_outputs(
            "audit", main="rows"))
        rows = out.rows
        audits.append(out.audit)
    keyed_rows = rows | "Key rows by file" >> beam.Map(lambda e: (e[0], (e[1], e[2])))
    all_audits = audits | "Collect audits" >> beam.Flatten()
    return ({"rows": keyed_rows, "audit": all_audits}
            | "Group by file" >> beam.CoGroupByKey()
            | "Write shards per file" >> beam.ParDo(WriteFile(recipe, len(segments) - 1)))


class BeamEngine:
    """Builds and runs the Beam pipeline; see the module docstring."""

    name = "beam"

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress

    def map_files(self, fn, args: list[tuple]) -> list[Any]:
        """The split planning pass runs before the pipeline is built, in a local pool
        of ``engine.workers`` processes (``LocalEngine.map_files``), not on the
        runner's workers; results in order."""
        from gristmill.pipeline.engines.local import LocalEngine

        return LocalEngine(self.recipe, progress=False).map_files(fn, args)

    def _runner_and_options(self):
        from apache_beam.options.pipeline_options import PipelineOptions

        spec = self.recipe.engine
        options = dict(spec.beam_options)
        runner = spec.runner or "fn_api"
        if runner == "fn_api":
            from apache_beam.runners.portability.fn_api_runner import FnApiRunner

            if spec.workers > 1:
                options.setdefault("direct_num_workers", spec.workers)
                options.setdefault("direct_running_mode", "multi_processing")
            return FnApiRunner(), PipelineOptions(flags=[], **options)
        if runner == "bundle_based":
            from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner

            return BundleBasedDirectRunner(), PipelineOptions(flags=[], **options)
        if runner in ("DirectRunner", "PrismRunner"):
            raise RecipeError(f"recipe error at engine.runner: {runner!r} downloads a runner "
                              f"binary; use one of {', '.join(LOCAL_RUNNERS)} for a local run")
        return runner, PipelineOptions(flags=[], runner=runner, **options)

    def _resume_point(self, tasks: list[InputTask], segments: list[Segment],
                      work: Path) -> tuple[list[InputTask], frozenset[int]]:
        """What a killed run left that this one reuses: the input files still to do,
        and the barriers whose state is saved (said on stderr before anything runs).

        A file is done when its result (``_work/beam/task-NNNNN.json``, written
        after its shards) is there. A barrier's state is saved once every file
        went through it, so the saved states are a prefix of the barriers, and
        every barrier is saved as soon as one file is done: then only the other
        files are read and run again, with the saved states as side inputs.
        """
        results_dir = work / "beam"
        todo = [t for t in tasks if not (results_dir / f"task-{t.index:05d}.json").exists()]
        barriers = [s.index for s in segments[:-1]]
        saved: list[int] = []
        for i in barriers:
            if not storage.exists(_state_path(work, i)):
                break
            saved.append(i)
        if len(todo) < len(tasks) and len(saved) < len(barriers):  # not from this engine
            todo, saved = list(tasks), []
            _remove_tree(results_dir)
        if todo and (len(todo) < len(tasks) or saved):
            print(f"gristmill: resuming a killed beam run in {storage.url(work)}: "
                  f"{len(tasks) - len(todo)} of {len(tasks)} files already written, "
                  f"{len(saved)} of {len(barriers)} barrier state(s) reused; reading "
                  f"{len(todo)} file(s) again", file=sys.stderr)
        elif todo and (storage.is_dir(work / "ids") or storage.exists(work / "seg00")):
            # it read files (their id ledgers are there) but finished no barrier
            print(f"gristmill: the killed beam run in {storage.url(work)} saved no barrier "
                  f"state and wrote no file; starting it over", file=sys.stderr)
        return todo, frozenset(saved)

    def execute(self, tasks: list[InputTask], work: Path) -> EngineResult:
        import apache_beam as beam

        stages = self.recipe.build_stages()
        segments = plan_segments(stages)
        results_dir = work / "beam"
        todo, saved = self._resume_point(tasks, segments, work)
        if todo:
            for seg in segments:  # whatever a killed run left of the files still to do
                for t in todo:
                    d = task_dir(work, seg.index, t.index)
                    if d.exists():
                        _remove_tree(d)
            runner, options = self._runner_and_options()
            name = runner if isinstance(runner, str) else type(runner).__name__
            with _FilesWrittenBar(results_dir, len(tasks), f"beam on {name}",
                                  self.progress):
                with beam.Pipeline(runner=runner, options=options) as p:
                    _build_pipeline(beam, p, self.recipe, todo, work, saved)
        per_task = []
        run_stats = TaskStats()  # merged as the results are read, never kept per file
        for t in tasks:
            res = json.loads((results_dir / f"task-{t.index:05d}.json").read_text())
            run_stats.merge(TaskStats.from_json(res.pop("stats")))
            per_task.append(TaskResult(index=t.index, file=res.get("file", {}),
                                       shards=res["shards"],
                                       rejects_file=res.get("rejects_file"),
                                       dropped_files=res["dropped_files"]))
        artifacts: dict[str, dict[str, bytes]] = {}
        for seg in segments[:-1]:
            with storage.open_read(_state_path(work, seg.index)) as f:
                state = pickle.load(f)
            stage = next(s for s in stages if s.name == seg.exit.name)
            files = stage.artifacts(state)
            if files:
                artifacts[stage.name] = files
        return EngineResult(tasks=per_task, artifacts=artifacts,
                            final_dir=work / f"seg{len(segments) - 1:02d}", stats=run_stats)


def _state_path(work: Path, segment: int) -> Path:
    return work / f"seg{segment:02d}" / "state.pkl"


def _spill_path(work: Path, segment: int, task: int) -> Path:
    return task_dir(work, segment, task) / "summary.spill"


def _remove_tree(path: Path) -> None:
    storage.remove_tree(path)


class _FilesWrittenBar:
    """A progress bar of input files whose shards are written, polled from the
    result files while the pipeline runs (Beam reports no progress itself)."""

    def __init__(self, folder: Path, total: int, desc: str, enabled: bool) -> None:
        self.folder, self.total, self.desc, self.enabled = folder, total, desc, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        bar = tqdm(total=self.total, desc=self.desc, unit="file", dynamic_ncols=True)
        while True:
            stopping = self._stop.wait(0.5)
            done = len(storage.glob_files(self.folder / "task-*.json"))
            bar.update(done - bar.n)
            if stopping:
                break
        bar.close()

    def __enter__(self) -> _FilesWrittenBar:
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
