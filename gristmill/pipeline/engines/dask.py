"""The Dask engine: the local engine's tasks, scheduled on a ``dask.distributed`` cluster.

Every (segment, input file) task is the local engine's ``run_task`` (same
readers, stages, spill files, done markers and shard writer), submitted to a
Dask cluster instead of a process pool. Barriers run on the cluster too: a
shuffle stage's ``reduce`` runs as one Dask task per key partition (each
partition holds whole key groups: keys were split by ``key % P`` when they
were written), a global stage's summaries merge as a tree of Dask tasks, and
only ``resolve`` / ``finalize`` run on the client.

Cluster: a ``LocalCluster`` of ``engine.workers`` worker processes (one thread
each) on loopback by default, closed when the run ends; or an existing
scheduler with ``engine.scheduler: tcp://HOST:PORT`` (Slurm via dask-jobqueue,
Kubernetes via dask-kubernetes...). Tasks hand data to each other through
``OUTPUT/_work`` (spills, key partitions, summaries, done markers), which is
also what makes a killed run resumable. With a remote cluster every worker must
import gristmill and reach the output: an object-store output
(``output.path: s3://bucket/run``) needs no shared filesystem at all, a local
output path must be on one (NFS, Lustre) at the same path on every worker.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gristmill.pipeline import observe, storage
from gristmill.pipeline.droplists import drop_list_state
from gristmill.pipeline.engines.local import (
    EngineResult,
    _load_state,
    execute_segments,
    finalize_spilled,
    reduce_partition,
    resolve_reduced,
    run_task,
    task_dir,
)
from gristmill.pipeline.readers import InputTask
from gristmill.pipeline.recipe import Recipe
from gristmill.pipeline.stage import GlobalStage, ShuffleStage, Stage, merge_all
from gristmill.pipeline.writers import atomic_write_bytes


def _reduce_partition(recipe: Recipe, work: Path, segment: int, task_indices: list[int],
                      partition: int, stage_name: str) -> Path | None:
    """Read one key partition from every task's spill, reduce it and write the reduced
    table to the work folder (runs on a worker); its path."""
    started = observe.start_clock()
    reduced = reduce_partition(recipe, work, segment, task_indices, partition, stage_name)
    observe.save_barrier_time(work, stage_name, "barrier", started)
    return reduced


def _forget_earlier_runs() -> None:
    """Clear a worker's per-process caches of the local engine. A long-lived
    cluster's workers outlive a run, and a rerun of the same output folder
    (``--fresh``, changed inputs) must not reuse the states cached by path."""
    from gristmill.pipeline.engines import local

    local._STATE_CACHE.clear()
    local._STAGE_CACHE.clear()
    local._SETUP_DONE.clear()


def _merge_pair(stage: GlobalStage, a: Any, b: Any) -> Any:
    """One node of the merge tree (runs on a worker); None is a task that saw no rows."""
    return merge_all(stage, [a, b])


def _load_summary(work: Path, segment: int, task: int) -> Any:
    with storage.open_read(task_dir(work, segment, task) / "summary.pkl") as f:
        return pickle.load(f)


class DaskEngine:
    """Runs the recipe's segments as Dask tasks; see the module docstring."""

    name = "dask"

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress

    def _client(self):
        from dask.distributed import Client, LocalCluster

        spec = self.recipe.engine
        if spec.scheduler:
            return Client(spec.scheduler), None
        cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        return Client(cluster), cluster

    def _gather(self, client, futures: list, desc: str,
                consume: Callable[[int, Any], None] | None = None) -> list[Any] | None:
        """Wait for ``futures`` with a progress bar. With ``consume``, each result is
        handed to ``consume(position, result)`` as it arrives and released on the
        cluster (nothing returned); without, the results in order."""
        from dask.distributed import as_completed

        bar = tqdm(total=len(futures), desc=desc, unit="task", disable=not self.progress,
                   dynamic_ncols=True)
        start = time.monotonic()
        position = {f.key: i for i, f in enumerate(futures)}
        for n, fut in enumerate(as_completed(futures), 1):
            if consume is not None:
                consume(position[fut.key], fut.result())
                fut.release()
            bar.set_postfix({"tasks/s": f"{n / max(time.monotonic() - start, 1e-9):.1f}"})
            bar.update(1)
        bar.close()
        return None if consume is not None else client.gather(futures)

    def _barrier(self, client, work: Path, segment_index: int, tasks: list[InputTask],
                 stage: Stage) -> Any:
        """Merge summaries (global) or reduce partitions on the cluster and resolve."""
        state_path = work / f"seg{segment_index:02d}" / "state.pkl"
        if state_path.exists():
            return _load_state(state_path)
        if isinstance(stage, GlobalStage) and stage.spills:
            started = observe.start_clock()
            # the client streams the tasks' spilled files; bounded memory, no tree
            state = finalize_spilled(work, segment_index, tasks, stage)
            observe.save_barrier_time(work, stage.name, "barrier", started)
        elif isinstance(stage, GlobalStage):
            started = observe.start_clock()
            # a tree of pairwise merges on the workers, neighbours in task order: the
            # client receives one merged summary, never every task's
            level = [client.submit(_load_summary, work, segment_index, t.index, pure=False)
                     for t in tasks]
            while len(level) > 1:
                nxt = [client.submit(_merge_pair, stage, level[i], level[i + 1], pure=False)
                       for i in range(0, len(level) - 1, 2)]
                level = nxt + level[len(nxt) * 2:]
            state = stage.finalize(level[0].result() if level else None)
            observe.save_barrier_time(work, stage.name, "barrier", started)
        elif isinstance(stage, ShuffleStage):
            indices = [t.index for t in tasks]
            futs = [client.submit(_reduce_partition, self.recipe, work, segment_index, indices,
                                  p, stage.name, pure=False)
                    for p in range(self.recipe.engine.shuffle_partitions)]
            # each worker writes its partition's reduced table to the work folder; the
            # client reads them back one at a time
            paths = self._gather(client, futs, f"reduce [{stage.name}]")
            started = observe.start_clock()
            state = resolve_reduced(stage, paths)
            state = drop_list_state(stage, state, work / f"seg{segment_index:02d}" / "drops")
            observe.save_barrier_time(work, stage.name, "barrier", started)
        else:
            raise TypeError(f"stage {stage.name!r} is no barrier")
        atomic_write_bytes(state_path, pickle.dumps(state))
        return state

    def map_files(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        """The split planning pass: one ``client.submit(fn, *a)`` per file, on the
        cluster (a worker reads the file where it is and sends back the small
        plan); results in order. Its own client, closed when the pass ends (a
        ``LocalCluster`` is started for it and again by ``execute``)."""
        client, cluster = self._client()
        try:
            futs = [client.submit(fn, *a, pure=False) for a in args]
            return self._gather(client, futs, "dask plan splits")
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def execute(self, tasks: list[InputTask], work: Path) -> EngineResult:
        client, cluster = self._client()
        try:
            client.run(_forget_earlier_runs)

            def map_tasks(seg, desc, consume):
                futs = [client.submit(run_task, self.recipe, work, seg.index, t, pure=False)
                        for t in tasks]
                self._gather(client, futs, desc, consume)
                del futs

            return execute_segments(
                self.recipe, tasks, work, map_tasks,
                barrier=lambda seg, stage: self._barrier(client, work, seg.index, tasks, stage),
                prefix="dask ")
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
