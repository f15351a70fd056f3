"""The stage contract every engine runs unchanged.

There are three kinds of stage. Each is a plain object built from validated
parameters; the engines (local, dask, beam) call the same methods in the same
order, so a stage never knows which engine runs it.

``RowStage`` (row-local; scorers and simple filters)
    ``setup()`` once per worker (load a model, a fastText file), then
    ``process(batch) -> StageOutput`` for every Arrow batch.

``GlobalStage`` (two phases; quantiles, top fractions, mixtures)
    ``summarize(batch) -> S`` on every batch, ``merge(S, S) -> S`` to combine
    (associative and commutative, so any reduction tree gives the same result),
    ``finalize(S) -> state`` once, then ``apply(batch, state) -> StageOutput``
    on every batch. ``state`` is broadcast to the workers, so keep it small.

``ShuffleStage`` (group by key; deduplication)
    ``keys(batch) -> pa.Table`` with a ``key`` column (uint64) and any other
    columns, the engine groups rows by ``key`` (spill files locally, a Dask
    shuffle, a Beam ``GroupByKey``) into partitions that hold whole groups,
    ``reduce(partition) -> pa.Table`` per partition, the engine concatenates
    the reduced tables and calls ``resolve(table) -> state`` once, then
    ``apply(batch, state) -> StageOutput`` on every batch.

A stage adds columns to kept rows (scorers) or drops rows (selectors). Every
dropped row is accounted for with the stage name and a reason, which is how
the counts reconcile: read = kept + dropped + rejected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

#: The pipeline's row identity: a uint64 column every reader adds, unique by
#: construction, ``(input file index << KEY_POS_BITS) | line or row number``
#: (1-based JSONL line, 0-based Parquet row). It is stable across resume,
#: engines and worker counts, and it is what every stage that tracks records
#: (dedup drop lists, survivors, sampling, tie-breaks) uses. The user's ``id``
#: is carried as data and may repeat.
ROW_KEY = "_key"
KEY_POS_BITS = 40  # up to 2**40 lines per file, 2**24 files per run
KEY_POS_MASK = (1 << KEY_POS_BITS) - 1


def make_keys(file_index: int, positions: np.ndarray | list[int]) -> pa.Array:
    """Row keys for ``positions`` (line or row numbers) of input file ``file_index``."""
    pos = np.asarray(positions, dtype=np.uint64)
    return pa.array((np.uint64(file_index) << np.uint64(KEY_POS_BITS)) | pos, pa.uint64())


def format_key(key: int | None) -> str:
    """``<file index>:<line or row>``, the readable form of a row key."""
    if key is None:
        return "?"
    return f"{int(key) >> KEY_POS_BITS}:{int(key) & KEY_POS_MASK}"


DROPPED_SCHEMA = pa.schema(
    [
        (ROW_KEY, pa.uint64()),
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


class StageParams(BaseModel):
    """Base of every stage's parameters: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageOutput:
    """What a stage returns for one batch: the rows kept and the rows dropped.

    ``dropped`` has the columns of ``DROPPED_SCHEMA`` (row key, id, stage, reason,
    detail). ``weight``, set by a stage that selects by a weight (a top
    fraction's characters), is (weight in, weight kept); the engines add it up
    per stage as ``weight_in`` / ``weight_kept``.
    """

    kept: pa.Table
    dropped: pa.Table
    weight: tuple[int, int] | None = None

    @property
    def num_dropped(self) -> int:
        return self.dropped.num_rows


def empty_dropped() -> pa.Table:
    return DROPPED_SCHEMA.empty_table()


def keep_all(batch: pa.Table) -> StageOutput:
    return StageOutput(kept=batch, dropped=empty_dropped())


def split_batch(
    batch: pa.Table,
    keep: np.ndarray,
    stage: str,
    reasons: np.ndarray | list[str] | str,
    details: np.ndarray | list[str | None] | None = None,
) -> StageOutput:
    """Split ``batch`` by the boolean mask ``keep``.

    ``reasons`` gives, for every row (or as one string for all), why it was
    dropped; only the entries of dropped rows are used. ``details`` is optional
    free text per row (a survivor id, a score).
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (batch.num_rows,):
        raise ValueError(f"keep mask has shape {keep.shape}, batch has {batch.num_rows} rows")
    drop_idx = np.flatnonzero(~keep)
    kept = batch.filter(pa.array(keep)) if drop_idx.size else batch
    if drop_idx.size == 0:
        return StageOutput(kept=kept, dropped=empty_dropped())
    take = pa.array(drop_idx)
    ids = _flat(batch.column("id").take(take)) if "id" in batch.column_names else \
        pa.nulls(drop_idx.size, pa.string())
    keys = (_flat(batch.column(ROW_KEY).take(take)) if ROW_KEY in batch.column_names
            else pa.nulls(drop_idx.size, pa.uint64()))
    if isinstance(reasons, str):
        reason_col = pa.array([reasons] * drop_idx.size, pa.string())
    else:
        reason_col = pa.array(np.asarray(reasons, dtype=object)[drop_idx], pa.string())
    if details is None:
        detail_col = pa.nulls(drop_idx.size, pa.string())
    else:
        detail_col = pa.array(np.asarray(details, dtype=object)[drop_idx], pa.string())
    dropped = pa.Table.from_arrays(
        [keys, ids, pa.array([stage] * drop_idx.size, pa.string()), reason_col, detail_col],
        schema=DROPPED_SCHEMA,
    )
    return StageOutput(kept=kept, dropped=dropped)


def _flat(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


class Stage:
    """Base of every stage.

    Subclasses set ``type_name`` (the name a recipe uses), ``Params`` (a
    ``StageParams`` model, validated when the recipe is loaded) and, where a
    stage needs columns, ``requires`` (checked against the source kind before
    any data is read), and, where it needs an optional dependency group,
    ``extras`` (``("torch",)``; see :mod:`gristmill.extras`). A stage module
    imports such dependencies inside ``setup`` or the functions that use
    them, never at the top, so a recipe can be checked without them.

    Parameters
    ----------
    params : StageParams
        Validated parameters.
    name : str
        This stage's name in the run (defaults to ``type_name``); scorers name
        their output columns after it and drops are recorded under it.
    seed : int
        The recipe's seed. Randomness must be a hash of (seed, record id),
        never a sequential RNG, so results do not depend on partitioning.
    """

    type_name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = StageParams
    requires: ClassVar[tuple[str, ...]] = ()
    extras: ClassVar[tuple[str, ...]] = ()
    #: parameters naming a model, tokenizer or list file the stage loads in
    #: ``setup()`` through ``local_path``: ``"model"``, ``"models[].path"`` (``[]``:
    #: every item of a list); a run pins each one (``model_cache.plan_pins``)
    path_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: StageParams | dict | None = None, *, name: str | None = None,
                 seed: int = 0) -> None:
        if params is None:
            params = {}
        if isinstance(params, dict):
            params = self.Params(**params)
        self.params = params
        self.name = name or self.type_name
        self.seed = seed

    #: folder that relative paths in the parameters resolve against (the recipe's
    #: folder); set by ``Recipe.build_stages`` so it travels with the stage to workers
    base_dir: str = "."

    def resolve_path(self, path: str) -> str:
        """A parameter path made absolute against ``base_dir`` (``~`` expanded);
        a URL (``s3://bucket/model.bin``) is returned as it is."""
        from gristmill.pipeline.storage import is_remote

        if is_remote(path):
            return path
        path = os.path.expanduser(path)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))

    #: the run's pins of this stage's ``model_paths``, by path (set by
    #: ``Recipe.build_stages``; empty outside a run)
    pins: dict[str, dict[str, Any]] = {}

    def local_path(self, path: str) -> str:
        """``resolve_path(path)`` as a local path a library can open: a URL's file
        or folder is downloaded once per machine into the model cache
        (``gristmill.pipeline.model_cache.localize``), the version the run pinned
        when it has a pin (a local path is checked against its pin). Call it in
        ``setup()``."""
        from gristmill.pipeline.model_cache import localize, redact

        resolved = self.resolve_path(path)
        return localize(resolved, pin=self.pins.get(redact(resolved)))

    def model_paths(self) -> list[tuple[str, str]]:
        """``(field, resolved path or URL)`` of every file this stage loads that is
        named by ``path_fields`` (``("models[1].path", "s3://m/lm")``)."""
        from gristmill.pipeline.model_cache import param_paths

        return [(f, self.resolve_path(p)) for f, p in param_paths(self.params, self.path_fields)]

    def required_extras(self) -> tuple[str, ...]:
        """Extras (``pip install 'gristmill[<extra>]'``) this configured stage needs.

        ``check_recipe`` looks them up before any data is read and stops with
        one line naming a missing one. The default is the class's ``extras``;
        a stage whose needs depend on its parameters (a tokenizer, a model)
        overrides this.
        """
        return self.extras

    def setup(self) -> None:
        """Load heavy resources; called once per worker before any batch."""

    def check(self, base_dir: str) -> None:
        """Validate what can be validated without reading data (files exist...).

        Raise ``ValueError`` naming the parameter. ``base_dir`` is the folder
        relative paths in the recipe are resolved against.
        """

    def artifacts(self, state: Any) -> dict[str, bytes]:
        """Files this stage publishes beside the shards, from its final state.

        Called once by the engine after ``finalize``/``resolve`` (global and
        shuffle stages); each ``{filename: content}`` is written atomically to
        ``OUTPUT/artifacts/<stage name>/<filename>`` (a mixture schedule, a
        distilled set, a learned threshold).
        """
        return {}

    def input_columns(self) -> tuple[str, ...]:
        """Columns this stage reads; checked against the sources and earlier stages."""
        return self.requires

    def output_columns(self) -> tuple[str, ...]:
        """Columns this stage adds to kept rows (so later stages can be checked)."""
        return ()

    def __getstate__(self) -> dict[str, Any]:
        # Heavy resources loaded by setup() are private attributes starting
        # with "_"; they are reloaded per worker, never pickled.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"


class RowStage(Stage):
    kind = "row"

    def process(self, batch: pa.Table) -> StageOutput:
        raise NotImplementedError


class GlobalStage(Stage):
    """Two phases (module doc). A stage whose summary grows with the records it saw
    (a top fraction's per-record scores) sets ``spills``: the engine then merges
    summaries only within a task, writes each task's summary to a file with
    ``spill_summary`` and calls ``finalize_spilled`` on those files instead of
    merging summaries in memory, so no process holds the whole corpus's summary.
    """

    kind = "global"
    spills: ClassVar[bool] = False

    def summarize(self, batch: pa.Table) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def spill_summary(self, summary: Any, sink: BinaryIO) -> None:
        """Write one task's merged summary (not None) to the binary file ``sink``."""
        raise NotImplementedError(f"{type(self).__name__} does not spill its summaries")

    def finalize_spilled(self, sources: list[Callable[[], BinaryIO]]) -> Any:
        """The state from the spilled summaries: ``sources[i]()`` opens the i-th file
        for reading (files in task order; none when no task saw a row)."""
        raise NotImplementedError(f"{type(self).__name__} does not spill its summaries")

    def finalize(self, summary: Any) -> Any:
        """Turn the merged summary into the state ``apply`` needs (default: itself).

        ``summary`` is None when the stage saw no rows at all.
        """
        return summary

    def apply(self, batch: pa.Table, state: Any) -> StageOutput:
        raise NotImplementedError


class ShuffleStage(Stage):
    """Group by key (module doc). A stage whose ``resolve`` returns the dropped
    records as a table with a ``ROW_KEY`` column (dedup) sets ``drop_lists``:
    the engine then writes that table as sorted per-input-file files and hands
    ``apply`` a ``gristmill.pipeline.droplists.DropLists`` instead, whose
    ``rows_for(row keys)`` reads only the part a batch needs."""

    kind = "shuffle"
    drop_lists: ClassVar[bool] = False

    def keys(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def reduce(self, partition: pa.Table) -> pa.Table:
        raise NotImplementedError

    def resolve(self, reduced: pa.Table) -> Any:
        raise NotImplementedError

    def resolve_parts(self, parts: Iterable[pa.Table | None]) -> Any:
        """``resolve`` over every key partition's reduced table, given in partition
        order (the engines call this). The default concatenates them; a stage that
        can take them one at a time (dedup) overrides it to hold less."""
        tables = [t for t in parts if t is not None and t.num_rows]
        return self.resolve(pa.concat_tables(tables) if tables else None)

    def apply(self, batch: pa.Table, state: Any) -> StageOutput:
        raise NotImplementedError


def merge_all(stage: GlobalStage, summaries: Iterable[Any]) -> Any:
    """Merge summaries as a balanced tree, keeping their order; None entries (no
    rows) are skipped.

    A left fold ``merge(merge(merge(s1, s2), s3), ...)`` of ``k`` summaries that
    concatenate (a top fraction's per-record scores) copies everything merged so
    far at every step: ``O(n k)`` bytes for ``n`` records, quadratic in the task
    count. Merging neighbours of equal size (a binary counter over the stream)
    copies each record ``log2 k`` times, ``O(n log k)``, and holds at most
    ``log2 k`` partial results besides the summaries not yet read, so a lazy
    iterable (summaries loaded one at a time) keeps memory at the merged size.
    The result is the same summary: neighbours are merged left to right, so a
    concatenation keeps its order.
    """
    stack: list[tuple[int, Any]] = []  # (number of summaries merged in, summary)
    for s in summaries:
        if s is None:
            continue
        size = 1
        while stack and stack[-1][0] == size:
            left_size, left = stack.pop()
            s = stage.merge(left, s)
            size += left_size
        stack.append((size, s))
    if not stack:
        return None
    acc = stack.pop()[1]
    while stack:
        acc = stage.merge(stack.pop()[1], acc)
    return acc
