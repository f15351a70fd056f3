"""Dedup's resolve, folded a partition at a time, against plain-Python references.

The engines hand ``resolve_parts`` every key partition's reduced edges one at a
time; MinHash pairs repeat across partitions (one copy per shared band), and
``EdgeSet`` folds the copies away. Whatever the partitioning and the copies,
the dropped records and survivors must be the ones a direct reading of the
policy gives: connected components with their best (transitive), or the best
first visit over verified edges (verified).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from gristmill.pipeline.hashing import mix64
from gristmill.selectors.dedup import EDGES_SCHEMA, EdgeSet, ExactDedup, hex16
from gristmill.selectors.minhash import MinHashDedup


def _rank(score: dict[int, float]):
    return lambda k: (-score[k], k)


def _transitive_reference(edges: list[tuple[int, int]], score: dict[int, float]) -> dict:
    parent = {k: k for e in edges for k in e}

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in edges:
        parent[find(a)] = find(b)
    comps: dict[int, list[int]] = {}
    for k in parent:
        comps.setdefault(find(k), []).append(k)
    out = {}
    for members in comps.values():
        best = min(members, key=_rank(score))
        out.update({m: best for m in members if m != best})
    return out


def _verified_reference(edges: list[tuple[int, int]], score: dict[int, float]) -> dict:
    nodes = sorted({k for e in edges for k in e}, key=_rank(score))
    pos = {k: i for i, k in enumerate(nodes)}
    better_of: dict[int, set[int]] = {k: set() for k in nodes}
    for a, b in edges:
        lo, hi = (a, b) if pos[a] > pos[b] else (b, a)  # hi is the better end
        better_of[lo].add(hi)
    kept: set[int] = set()
    out = {}
    for k in nodes:
        kept_better = [b for b in better_of[k] if b in kept]
        if kept_better:
            out[k] = min(kept_better, key=_rank(score))
        else:
            kept.add(k)
    return out


def _edges_table(pairs: list[tuple[int, int]], score: dict[int, float]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array([a for a, _ in pairs], pa.uint64()),
         pa.array([score[a] for a, _ in pairs], pa.float64()),
         pa.array([b for _, b in pairs], pa.uint64()),
         pa.array([score[b] for _, b in pairs], pa.float64())], schema=EDGES_SCHEMA)


graphs = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
             .filter(lambda e: e[0] != e[1]), min_size=1, max_size=3 * n),
    st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0, -np.inf]), min_size=n, max_size=n),
    st.integers(1, 7),  # partitions
    st.integers(0, 3),  # extra copies of each edge
    st.integers(0, 2**32 - 1)))


@settings(max_examples=120, deadline=None)
@given(graphs)
def test_folded_resolve_equals_the_policy(case):
    pairs, scores, parts, copies, seed = case
    rng = np.random.default_rng(seed)
    keys = rng.choice(2**44, size=len(scores), replace=False).astype(np.uint64)
    score = {int(k): s for k, s in zip(keys, scores, strict=True)}
    edges = [(int(keys[a]), int(keys[b])) for a, b in pairs]
    # reduce points every edge from its worse end to its better one
    oriented = [(a, b) if _rank(score)(a) > _rank(score)(b) else (b, a) for a, b in edges]
    rows = oriented * (copies + 1)
    order = rng.permutation(len(rows))
    cut = np.sort(rng.integers(0, len(rows) + 1, parts - 1))
    chunks = [[rows[i] for i in piece] for piece in np.split(order, cut)]
    tables = [_edges_table(c, score) if c else None for c in chunks]
    for stage, reference in ((ExactDedup(), _transitive_reference),
                             (MinHashDedup(), _verified_reference)):
        EdgeSet.FOLD_ROWS = 3  # fold often: the folding itself is under test
        try:
            state = stage.resolve_parts(tables)
        finally:
            EdgeSet.FOLD_ROWS = 1 << 16
        got = dict(zip(state.column("_key").to_pylist(), state.column("survivor").to_pylist(),
                       strict=True))
        assert got == reference(oriented, score), stage.type_name
        assert state.column("_key").to_pylist() == sorted(got)
        surv = np.array(state.column("survivor").to_pylist(), np.uint64)
        assert state.column("cluster").to_pylist() == [
            f"{int(v):016x}" for v in mix64(surv, seed=stage.seed, salt=stage.name)]


def test_cluster_names_are_the_survivors_hashed():
    st_ = ExactDedup()
    edges = _edges_table([(5, 9), (7, 9), (11, 13)], {5: 1.0, 7: 1.0, 9: 2.0, 11: 1.0, 13: 3.0})
    state = st_.resolve(edges)
    assert state.column("_key").to_pylist() == [5, 7, 11]
    assert state.column("survivor").to_pylist() == [9, 9, 13]
    want = [f"{int(v):016x}" for v in mix64(np.array([9, 9, 13], np.uint64), seed=st_.seed,
                                             salt=st_.name)]
    assert state.column("cluster").to_pylist() == want


def test_hex16_matches_printf():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.integers(0, 2**63, 500, dtype=np.uint64) * np.uint64(2),
                        np.array([0, 1, 15, 16, 2**64 - 1], np.uint64)])
    assert hex16(v).to_pylist() == [f"{int(x):016x}" for x in v]
    assert hex16(np.zeros(0, np.uint64)).to_pylist() == []


def test_copies_of_an_edge_are_held_once():
    edges = EdgeSet()
    edges.FOLD_ROWS = 4
    score = {1: 1.0, 2: 2.0, 3: 3.0}
    for _ in range(50):
        edges.add(_edges_table([(1, 2), (2, 3), (1, 3)], score))
    w, b, sw, sb = edges.arrays()
    assert list(zip(w.tolist(), b.tolist(), strict=True)) == [(1, 2), (1, 3), (2, 3)]
    assert sw.tolist() == [1.0, 1.0, 2.0] and sb.tolist() == [2.0, 3.0, 3.0]
    assert edges._distinct == 3
