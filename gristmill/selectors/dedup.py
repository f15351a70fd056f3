"""Cluster deduplication: records that share a key are one cluster; keep its best.

Both exact dedup (key = hash of the normalized text) and MinHash near dedup
(keys = LSH band hashes) are the same shuffle::

    keys(batch)      -> (key, id, score) rows, one or more per record
    engine shuffle   -> partitions holding whole key groups
    reduce(part)     -> edges member -> best member of its group
    resolve(edges)   -> connected components (union-find); the survivor of a
                        cluster is its best member; state = dropped ids only
    apply(batch, st) -> drop the ids in the state

"Best" is the highest ``score`` (by default the text length in characters,
configurable with ``keep: {column: NAME, order: max|min}``), ties broken by
the smallest id, so the survivor never depends on arrival order, partitioning
or engine.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from gristmill.pipeline.hashing import hash64, mix64, normalize_text
from gristmill.pipeline.stage import (
    ROW_KEY,
    ShuffleStage,
    StageOutput,
    StageParams,
    format_key,
    keep_all,
    split_batch,
)

# Records are identified by the pipeline's row key (ROW_KEY), never by the
# user's id: ids may repeat (per-file numbering) where records do not.
KEYS_SCHEMA = pa.schema([("key", pa.uint64()), (ROW_KEY, pa.uint64()), ("score", pa.float64())])
EDGES_SCHEMA = pa.schema([(ROW_KEY, pa.uint64()), ("score", pa.float64()),
                          ("best_key", pa.uint64()), ("best_score", pa.float64())])
STATE_SCHEMA = pa.schema([(ROW_KEY, pa.uint64()), ("cluster", pa.string()),
                          ("survivor", pa.uint64())])


class KeepSpec(BaseModel):
    """Which member of a duplicate cluster survives."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    column: str | None = Field(None, description="numeric column to rank by; default: text "
                               "length in characters")
    order: Literal["max", "min"] = Field("max", description="keep the largest (max) or the "
                                         "smallest (min) value")


class ClusterDedupParams(StageParams):
    keep: KeepSpec = KeepSpec()


class ClusterDedup(ShuffleStage):
    """Base of the dedup stages: subclasses say how a batch is keyed.

    Subclasses implement ``record_keys(batch) -> (keys, rows, extra)``: uint64
    keys, for each key the index of the row it belongs to (a record may have
    many keys, as MinHash has one per band), and extra columns of the keys
    table (one value per key; MinHash may add signatures). ``verify`` may
    reject candidate edges. ``reason`` names the drop.
    """

    reason: ClassVar[str] = "duplicate"
    text_column: ClassVar[str] = "text"

    def input_columns(self) -> tuple[str, ...]:
        col = self.params.keep.column
        return (self.text_column,) + ((col,) if col else ())

    # -- keys ------------------------------------------------------------------
    def record_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, dict[str, pa.Array]]:
        raise NotImplementedError

    def verify(self, group: pa.Table, member: np.ndarray, best: np.ndarray) -> np.ndarray | None:
        """Which candidate edges ``member[i] -> best[i]`` (row indices of the sorted
        partition ``group``) are real; None keeps them all."""
        return None

    def scores(self, batch: pa.Table) -> np.ndarray:
        """Survivor criterion per row, higher is better (nulls rank last)."""
        keep = self.params.keep
        if keep.column is None:
            values = pc.utf8_length(batch.column(self.text_column))
        else:
            values = batch.column(keep.column)
        score = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        if keep.order == "min":
            score = -score
        score[np.isnan(score)] = -np.inf
        return score

    def keys(self, batch: pa.Table) -> pa.Table:
        keys, rows, extra = self.record_keys(batch)
        rows_arr = pa.array(rows, pa.int64())
        if ROW_KEY not in batch.column_names:
            raise ValueError(f"{self.name}: the batch has no {ROW_KEY!r} column (the row key "
                             "every gristmill reader adds); records are tracked by it")
        ids = batch.column(ROW_KEY).take(rows_arr)
        score = self.scores(batch)[rows]
        table = pa.Table.from_arrays(
            [pa.array(keys, pa.uint64()),
             ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids,
             pa.array(score, pa.float64())], schema=KEYS_SCHEMA)
        for name, col in extra.items():
            table = table.append_column(name, col)
        return table

    # -- reduce ----------------------------------------------------------------
    def reduce(self, partition: pa.Table) -> pa.Table:
        """One edge per member of every group of two or more: member -> group best.

        Sorting by (key, score desc, row key asc) puts each group's best first, so the
        whole partition is handled with one sort and array arithmetic.
        """
        if partition is None or partition.num_rows < 2:
            return EDGES_SCHEMA.empty_table()
        t = partition.sort_by([("key", "ascending"), ("score", "descending"),
                               (ROW_KEY, "ascending")])
        key = t.column("key").to_numpy()
        start = np.ones(key.size, dtype=bool)
        start[1:] = key[1:] != key[:-1]
        group_first = np.maximum.accumulate(np.where(start, np.arange(key.size), 0))
        member = np.flatnonzero(~start)
        if member.size == 0:
            return EDGES_SCHEMA.empty_table()
        best = group_first[member]
        ok = self.verify(t, member, best)
        if ok is not None:
            member, best = member[ok], best[ok]
        ids = t.column(ROW_KEY).combine_chunks()
        score = t.column("score").combine_chunks()
        m, b = pa.array(member), pa.array(best)
        edges = pa.Table.from_arrays([ids.take(m), score.take(m), ids.take(b), score.take(b)],
                                     schema=EDGES_SCHEMA)
        # a record keyed twice into one group (MinHash bands that collide) is no edge
        return edges.filter(pc.not_equal(edges.column(ROW_KEY), edges.column("best_key")))

    # -- resolve ---------------------------------------------------------------
    def resolve(self, reduced: pa.Table | None) -> pa.Table:
        """Connected components over all edges; the survivor is each cluster's best.

        Returns the dropped records only (row key, cluster, survivor's row key),
        sorted by row key, so
        memory is proportional to the duplicates, not the corpus.
        """
        if reduced is None or reduced.num_rows == 0:
            return STATE_SCHEMA.empty_table()
        reduced = reduced.cast(EDGES_SCHEMA)
        both = np.concatenate([reduced.column(ROW_KEY).to_numpy(),
                               reduced.column("best_key").to_numpy()]).astype(np.uint64)
        both_score = np.concatenate([reduced.column("score").to_numpy(),
                                     reduced.column("best_score").to_numpy()])
        nodes, idx = np.unique(both, return_inverse=True)  # node index order == key order
        idx = idx.astype(np.int64)
        n = len(nodes)
        node_score = np.empty(n, dtype=np.float64)
        node_score[idx] = both_score
        e = reduced.num_rows
        graph = coo_matrix((np.ones(e, dtype=np.int8), (idx[:e], idx[e:])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        # best first within a component: score descending, then smallest row key (index)
        order = np.lexsort((np.arange(n), -node_score, comp))
        comp_sorted = comp[order]
        first = np.ones(n, dtype=bool)
        first[1:] = comp_sorted[1:] != comp_sorted[:-1]
        survivor_of_comp = np.empty(comp.max() + 1, dtype=np.int64)
        survivor_of_comp[comp_sorted[first]] = order[first]
        survivor = survivor_of_comp[comp]
        dropped = np.flatnonzero(survivor != np.arange(n))
        surv = nodes[survivor[dropped]]
        cluster = np.char.mod("%016x", mix64(surv, seed=self.seed, salt=self.name))
        return pa.Table.from_arrays(
            [pa.array(nodes[dropped], pa.uint64()), pa.array(cluster.tolist(), pa.string()),
             pa.array(surv, pa.uint64())], schema=STATE_SCHEMA)

    # -- apply -----------------------------------------------------------------
    def apply(self, batch: pa.Table, state: pa.Table) -> StageOutput:
        if state is None or state.num_rows == 0 or batch.num_rows == 0:
            return keep_all(batch)
        pos = pc.index_in(batch.column(ROW_KEY),
                          value_set=state.column(ROW_KEY).combine_chunks())
        hit = pc.is_valid(pos).to_numpy(zero_copy_only=False)
        if not hit.any():
            return keep_all(batch)
        where = pos.to_numpy(zero_copy_only=False)
        details = np.full(batch.num_rows, None, dtype=object)
        rows = np.flatnonzero(hit)
        taken = state.take(pa.array(where[rows].astype(np.int64)))
        details[rows] = [f"cluster={c} survivor={format_key(s)}" for c, s in
                         zip(taken.column("cluster").to_pylist(),
                             taken.column("survivor").to_pylist(), strict=True)]
        return split_batch(batch, ~hit, self.name, self.reason, details)


class ExactDedupParams(ClusterDedupParams):
    normalize: bool = Field(True, description="compare texts after NFKC, lower case, "
                            "punctuation removed and whitespace collapsed")


class ExactDedup(ClusterDedup):
    """Drop every record whose (normalized) text equals a better record's.

    The key is ``hash64(normalize_text(text))`` (64-bit BLAKE2b; a false match
    needs a 64-bit collision). Each cluster of equal texts keeps its best member
    by ``keep`` (default: the longest text, then the smallest id); the others are
    dropped with reason ``exact_duplicate`` and detail ``cluster=<c> survivor=<id>``.

    Examples
    --------
    >>> import pyarrow as pa
    >>> st = ExactDedup()
    >>> batch = pa.table({"_key": pa.array([1, 2, 3], pa.uint64()), "id": ["a", "b", "c"],
    ...                   "text": ["Hi there!", "hi  there", "other"]})
    >>> state = st.resolve(st.reduce(st.keys(batch)))
    >>> st.apply(batch, state).kept.column("id").to_pylist()
    ['a', 'c']
    """

    type_name = "exact_dedup"
    Params: ClassVar = ExactDedupParams
    reason = "exact_duplicate"

    def record_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, dict[str, pa.Array]]:
        texts = batch.column(self.text_column).to_pylist()
        if self.params.normalize:
            texts = [normalize_text(t or "") for t in texts]
        else:
            texts = [t or "" for t in texts]
        return hash64(texts, seed=0, salt="exact_dedup"), np.arange(batch.num_rows), {}
