"""Cluster deduplication: records that share a key are candidates; keep the best.

Both exact dedup (key = hash of the normalized text) and MinHash near dedup
(keys = LSH band hashes) are the same shuffle::

    keys(batch)      -> (key, row key, score) rows, one or more per record
    engine shuffle   -> partitions holding whole key groups
    reduce(part)     -> edges member -> better member
    resolve(edges)   -> the dropped records, each with the kept survivor it
                        duplicates; state = dropped row keys only
    apply(batch, st) -> drop the row keys in the state

"Best" is the highest ``score`` (by default the text length in characters,
configurable with ``keep: {column: NAME, order: max|min}``), ties broken by
the smallest row key, so the survivor never depends on arrival order,
partitioning or engine.

Two policies turn edges into drops:

- *transitive* (exact dedup, and MinHash with ``verify: false``): every
  member of a group gets an edge to the group's best; connected components
  of all edges are clusters and every member but the best is dropped. Right
  for exact duplicates (equality is transitive); for LSH candidates it lets
  chains A~B~C drop C for A however far apart they are.
- *verified* (MinHash's default, ``pairwise = True``): each member of a group
  is compared with the group's first ``MAX_ANCHORS`` (best) members by
  ``verify_pairs``; only pairs that pass become edges, pointing from the
  worse record to the better one. Records are then decided best first: a
  record is dropped when one of its verified better neighbours is kept, and
  kept otherwise (the lexicographically first maximal independent set of the
  verified graph). So every dropped record is verified against its
  survivor, and survivor is kept: a chain through a dropped record never
  drops anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from gristmill.pipeline.droplists import DropLists
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
#: in the verified policy, each member of a group is compared with this many of the
#: group's best members (a group of m records costs at most m * MAX_ANCHORS checks)
MAX_ANCHORS = 8
#: rounds of the vectorized best-first decision before the rest is decided in a loop
MAX_ROUNDS = 64


def _anchor_pairs(group_first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (better, member) of a sorted table: every row with each of the first
    ``MAX_ANCHORS`` rows of its group that come before it."""
    pos = np.arange(group_first.size) - group_first
    member = np.flatnonzero(pos >= 1)
    betters, members = [], []
    for a in range(MAX_ANCHORS):
        member = member[pos[member] > a]
        if member.size == 0:
            break
        betters.append(group_first[member] + a)
        members.append(member)
    if not members:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(betters), np.concatenate(members)


def best_first_survivors(score: np.ndarray, better: np.ndarray,
                         worse: np.ndarray) -> np.ndarray:
    """Decide nodes best first over verified edges; the survivor of every node.

    Nodes are ranked by ``score`` descending, then index. Visiting them in that
    order, a node is dropped when one of its better neighbours (edges
    ``worse[i] -> better[i]``) was kept, and kept otherwise: the
    lexicographically first maximal independent set of the graph. A dropped
    node's survivor is its best kept better neighbour; a kept node is its own.

    The visit is vectorized in rounds: a node is decided as soon as one better
    neighbour is kept (dropped) or all of them are dropped (kept); every round
    decides at least the best undecided node. Chains longer than ``MAX_ROUNDS``
    finish in a plain loop.

    Examples
    --------
    >>> # 0 > 1 > 2 by score; 0~1 and 1~2 verified, 0 and 2 not: 1 goes, 2 stays
    >>> best_first_survivors(np.array([3.0, 2.0, 1.0]), np.array([0, 1]), np.array([1, 2]))
    array([0, 0, 2])
    """
    n = score.size
    order = np.lexsort((np.arange(n), -score))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    worse, better = np.asarray(worse, np.int64), np.asarray(better, np.int64)
    swap = rank[better] > rank[worse]  # orient every edge from the worse to the better end
    worse, better = np.where(swap, better, worse), np.where(swap, worse, better)
    status = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    status[np.setdiff1d(np.arange(n), worse)] = 1  # no better neighbour at all
    live = status[worse] == 0
    w, b = worse[live], better[live]
    rounds = 0
    while w.size and rounds < MAX_ROUNDS:
        rounds += 1
        sb = status[b]
        has_kept = np.zeros(n, dtype=bool)
        has_kept[w[sb == 1]] = True
        has_open = np.zeros(n, dtype=bool)
        has_open[w[sb == 0]] = True
        undecided = status == 0
        status[undecided & has_kept] = 2
        status[undecided & ~has_kept & ~has_open] = 1
        live = status[w] == 0
        w, b = w[live], b[live]
    if w.size:
        # long chains: the rest in rank order, one node at a time
        by_w = np.argsort(rank[w], kind="stable")
        w, b = w[by_w], b[by_w]
        bounds = np.flatnonzero(np.r_[True, w[1:] != w[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            status[w[lo]] = 2 if (status[b[lo:hi]] == 1).any() else 1
    survivor = np.arange(n)
    kept_edge = (status[worse] == 2) & (status[better] == 1)
    kw, kb = worse[kept_edge], better[kept_edge]
    pick = np.lexsort((rank[kb], kw))
    kw, kb = kw[pick], kb[pick]
    first = np.r_[True, kw[1:] != kw[:-1]] if kw.size else np.zeros(0, dtype=bool)
    survivor[kw[first]] = kb[first]
    return survivor


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex16(values: np.ndarray) -> pa.Array:
    """``"%016x"`` of every uint64 as an Arrow string array, without a Python
    string per value (16 bytes a value, vectorized).

    Examples
    --------
    >>> hex16(np.array([0, 255, 2**64 - 1], np.uint64)).to_pylist()
    ['0000000000000000', '00000000000000ff', 'ffffffffffffffff']
    """
    v = np.asarray(values, dtype=np.uint64)
    chars = np.empty((v.size, 16), dtype=np.uint8)
    for i in range(16):
        chars[:, 15 - i] = _HEX[((v >> np.uint64(4 * i)) & np.uint64(0xF)).astype(np.intp)]
    offsets = np.arange(0, 16 * (v.size + 1), 16, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), v.size,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def _stars(worse: np.ndarray, better: np.ndarray) -> bool:
    """Whether edges sorted by ``worse`` form stars: every worse end once, and no
    better end also a worse end (each component is then a best and its members,
    the best beating every member: reduce points members at their group's best)."""
    if worse.size > 1 and not (worse[1:] != worse[:-1]).all():
        return False
    return not np.isin(better, worse).any()


class EdgeSet:
    """Distinct edges ``worse -> better`` (row keys, with both ends' scores),
    added a reduced table at a time.

    Copies of an edge (MinHash: a pair verified in every partition where it
    shares a band) are folded away whenever the rows added since the last
    fold outnumber the distinct ones held (and at least ``FOLD_ROWS``), so
    memory stays within about twice the distinct edges plus one added table.
    A node's score is the same in every edge (one score per record).
    """

    FOLD_ROWS = 1 << 16

    def __init__(self) -> None:
        self._held: list[tuple[np.ndarray, ...]] = []
        self._distinct = 0
        self._pending = 0

    def add(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        t = table.cast(EDGES_SCHEMA)
        cols = tuple(t.column(c).to_numpy() for c in (ROW_KEY, "best_key", "score",
                                                      "best_score"))
        self._held.append(cols)
        self._pending += t.num_rows
        if self._pending > max(self._distinct, self.FOLD_ROWS):
            self._fold()

    def _fold(self) -> None:
        if len(self._held) > 1 or self._pending:
            w, b, sw, sb = (np.concatenate([h[i] for h in self._held]) for i in range(4))
            order = np.lexsort((b, w))
            w, b = w[order], b[order]
            keep = np.ones(w.size, dtype=bool)
            keep[1:] = (w[1:] != w[:-1]) | (b[1:] != b[:-1])
            order = order[keep]
            self._held = [(w[keep], b[keep], sw[order], sb[order])]
            self._distinct, self._pending = int(keep.sum()), 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(worse, better, worse score, better score), distinct, sorted by (worse, better)."""
        if not self._held:
            return (np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                    np.zeros(0, np.float64), np.zeros(0, np.float64))
        self._fold()
        return self._held[0]


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
    table (one value per key; MinHash adds signature sketches). A stage with
    ``pairwise`` true implements ``verify_pairs`` and gets the verified policy
    (module doc); otherwise groups are joined transitively. ``reason`` names
    the drop.
    """

    reason: ClassVar[str] = "duplicate"
    text_column: ClassVar[str] = "text"
    drop_lists = True

    @property
    def pairwise(self) -> bool:
        """Whether candidates are verified pair by pair (the verified policy)."""
        return False

    def input_columns(self) -> tuple[str, ...]:
        col = self.params.keep.column
        return (self.text_column,) + ((col,) if col else ())

    # -- keys ------------------------------------------------------------------
    def record_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, dict[str, pa.Array]]:
        raise NotImplementedError

    def verify_pairs(self, group: pa.Table, better: np.ndarray,
                     member: np.ndarray) -> np.ndarray:
        """Which candidate pairs ``(better[i], member[i])`` (row indices of the
        partition table ``group``) are duplicates: a boolean mask."""
        raise NotImplementedError(f"{type(self).__name__} sets pairwise but does not "
                                  "implement verify_pairs")

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
        """Edges "member -> better member" of every group of two or more.

        Sorting by (key, score desc, row key asc) puts each group's best first,
        so the whole partition is handled with one sort and array arithmetic.
        Transitive policy: one edge per member, to its group's best. Verified
        policy: candidate pairs (member, one of the group's first
        ``MAX_ANCHORS``), each distinct pair checked once by ``verify_pairs``.
        """
        if partition is None or partition.num_rows < 2:
            return EDGES_SCHEMA.empty_table()
        # sort the narrow columns only: wide extra columns (sketches) are taken once,
        # for the rows that end up in a group of two or more
        narrow = partition.select(["key", "score", ROW_KEY])
        order = pc.sort_indices(narrow, [("key", "ascending"), ("score", "descending"),
                                         (ROW_KEY, "ascending")]).to_numpy()
        key = narrow.column("key").to_numpy()[order]
        start = np.ones(key.size, dtype=bool)
        start[1:] = key[1:] != key[:-1]
        if self.pairwise:
            # most groups are single records: keep only the rows of larger groups
            gid = np.cumsum(start) - 1
            in_group = np.bincount(gid)[gid] >= 2
            if not in_group.any():
                return EDGES_SCHEMA.empty_table()
            order, start = order[in_group], start[in_group]
        t = partition.take(pa.array(order))
        group_first = np.maximum.accumulate(np.where(start, np.arange(start.size), 0))
        ids_np = t.column(ROW_KEY).to_numpy()
        if self.pairwise:
            better, member = _anchor_pairs(group_first)
            # a pair shares several bands: check each distinct (better, member) once
            order = np.lexsort((ids_np[member], ids_np[better]))
            better, member = better[order], member[order]
            first = np.ones(better.size, dtype=bool)
            first[1:] = ((ids_np[better][1:] != ids_np[better][:-1])
                         | (ids_np[member][1:] != ids_np[member][:-1]))
            better, member = better[first], member[first]
            # a record keyed twice into one group (a band-key collision) is no pair
            distinct = ids_np[better] != ids_np[member]
            better, member = better[distinct], member[distinct]
            if member.size:
                ok = np.asarray(self.verify_pairs(t, better, member), dtype=bool)
                better, member = better[ok], member[ok]
        else:
            member = np.flatnonzero(~start)
            better = group_first[member]
        if member.size == 0:
            return EDGES_SCHEMA.empty_table()
        ids = t.column(ROW_KEY).combine_chunks()
        score = t.column("score").combine_chunks()
        m, b = pa.array(member), pa.array(better)
        edges = pa.Table.from_arrays([ids.take(m), score.take(m), ids.take(b), score.take(b)],
                                     schema=EDGES_SCHEMA)
        # a record keyed twice into one group (MinHash bands that collide) is no edge
        return edges.filter(pc.not_equal(edges.column(ROW_KEY), edges.column("best_key")))

    # -- resolve ---------------------------------------------------------------
    def resolve(self, reduced: pa.Table | None) -> pa.Table:
        """The dropped records and their survivors, by the stage's policy (module doc).

        ``resolve_parts`` over one table; see there.
        """
        return self.resolve_parts([] if reduced is None else [reduced])

    def resolve_parts(self, parts: Iterable[pa.Table | None]) -> pa.Table:
        """The dropped records and their survivors, from the reduced edges of every
        key partition, read one partition at a time.

        Transitive: connected components over all edges, the survivor is each
        component's best; when no record is a member of two groups or both a
        member and a best (always so in exact dedup, one key per record), every
        component is a star around its best and no components are computed.
        Verified: best first over the verified edges, the survivor is the
        best kept record the dropped one was verified against.

        Memory is proportional to the distinct duplicate pairs, never to the
        corpus or to the candidate edges: a pair of MinHash records that
        shares several bands is verified in several partitions, and the
        copies are folded away as partitions arrive (``EdgeSet``), so at most
        one partition's edges are held beside the distinct ones. Returns the
        dropped records only (row key, cluster, survivor's row key), sorted by
        row key.
        """
        edges = EdgeSet()
        for part in parts:
            edges.add(part)
        worse, better, worse_score, better_score = edges.arrays()
        del edges
        if worse.size == 0:
            return STATE_SCHEMA.empty_table()
        if not self.pairwise and _stars(worse, better):
            # every component is one group's star around its best: no components needed
            return self._state_rows(worse, better)
        nodes = np.unique(np.concatenate([worse, better]))  # node index order == key order
        w = np.searchsorted(nodes, worse)
        b = np.searchsorted(nodes, better)
        del worse, better
        n = nodes.size
        node_score = np.empty(n, dtype=np.float64)
        node_score[w] = worse_score
        node_score[b] = better_score
        del worse_score, better_score
        if self.pairwise:
            return self._state(nodes, best_first_survivors(node_score, b, w))
        # imported here: scipy adds ~20 MB to every process that loads this module
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        graph = coo_matrix((np.ones(w.size, dtype=np.int8), (w, b)), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        del graph
        # best first within a component: score descending, then smallest row key (index)
        order = np.lexsort((np.arange(n), -node_score, comp))
        comp_sorted = comp[order]
        first = np.ones(n, dtype=bool)
        first[1:] = comp_sorted[1:] != comp_sorted[:-1]
        survivor_of_comp = np.empty(comp.max() + 1, dtype=np.int64)
        survivor_of_comp[comp_sorted[first]] = order[first]
        return self._state(nodes, survivor_of_comp[comp])

    def _state(self, nodes: np.ndarray, survivor: np.ndarray) -> pa.Table:
        """STATE_SCHEMA rows for the nodes whose survivor (a node index) is not themselves."""
        dropped = np.flatnonzero(survivor != np.arange(nodes.size))
        return self._state_rows(nodes[dropped], nodes[survivor[dropped]])

    def _state_rows(self, dropped: np.ndarray, survivor: np.ndarray) -> pa.Table:
        """STATE_SCHEMA rows (sorted by row key) for dropped row keys and their survivors."""
        order = np.argsort(dropped, kind="stable")
        dropped, survivor = dropped[order], survivor[order]
        cluster = hex16(mix64(survivor, seed=self.seed, salt=self.name))
        return pa.Table.from_arrays(
            [pa.array(dropped, pa.uint64()), cluster, pa.array(survivor, pa.uint64())],
            schema=STATE_SCHEMA)

    # -- apply -----------------------------------------------------------------
    def apply(self, batch: pa.Table, state: pa.Table | DropLists) -> StageOutput:
        """Drop the rows ``state`` lists: the resolved table, or per-file drop lists
        (an engine's) of which only the part for this batch's row keys is read."""
        if state is None or state.num_rows == 0 or batch.num_rows == 0:
            return keep_all(batch)
        if isinstance(state, DropLists):
            state = state.rows_for(batch.column(ROW_KEY).to_numpy(zero_copy_only=False))
            if state.num_rows == 0:
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
    by ``keep`` (default: the longest text, then the smallest row key); the others
    are dropped with reason ``exact_duplicate`` and detail
    ``cluster=<c> survivor=<file>:<line>``.

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
