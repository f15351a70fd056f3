"""Exact dedup and the cluster-dedup base: keys, reduce, resolve, apply, and a run."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import keyed, state_by_id
from pydantic import ValidationError

from gristmill.pipeline.execution import partition_keys
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import ROW_KEY, format_key
from gristmill.selectors.dedup import ExactDedup


def _run_stage(stage, batches: list[pa.Table], partitions: int = 3):
    """What an engine does: key every batch, group by key % P, reduce, resolve.
    Row keys are numbered in id order; the returned state is mapped back to ids."""
    batches = keyed(*batches)
    keys = pa.concat_tables([stage.keys(b) for b in batches])
    reduced = [stage.reduce(p) for p in partition_keys(keys, partitions)]
    state = stage.resolve(pa.concat_tables(reduced))
    return [stage.apply(b, state) for b in batches], state_by_id(state, batches)


def test_exact_dedup_keeps_longest_then_smallest_id_and_records_survivor():
    batch = pa.table({"id": ["d", "b", "a", "c", "e"],
                      "text": ["Hello, World", "hello world!!", "hello  world", "unique",
                               "HELLO WORLD!!"]})
    outs, state = _run_stage(ExactDedup(), [batch])
    # all but "unique" normalize to "hello world"; "b" and "e" are longest (13 chars), b < e
    assert outs[0].kept.column("id").to_pylist() == ["b", "c"]
    dropped = outs[0].dropped.to_pydict()
    assert sorted(dropped["id"]) == ["a", "d", "e"]
    assert set(dropped["reason"]) == {"exact_duplicate"}
    clusters = {d.split()[0] for d in dropped["detail"]}
    # the survivor is named by its row key, <file index>:<line>; b is key 1 of file 0
    assert len(clusters) == 1 and all(d.endswith("survivor=0:1") for d in dropped["detail"])
    assert state.column("id").to_pylist() == ["a", "d", "e"]


def test_exact_dedup_without_normalize_matches_raw_text_only():
    batch = pa.table({"id": ["a", "b", "c"], "text": ["Same text", "same text", "Same text"]})
    outs, _ = _run_stage(ExactDedup({"normalize": False}), [batch])
    assert outs[0].kept.column("id").to_pylist() == ["a", "b"]


def test_keep_column_min_picks_the_smallest_value_and_ties_go_to_smallest_id():
    batch = pa.table({"id": ["x3", "x1", "x2", "x0"], "text": ["t"] * 4,
                      "ppl": [5.0, 2.0, 2.0, None]})
    outs, state = _run_stage(ExactDedup({"keep": {"column": "ppl", "order": "min"}}), [batch])
    # nulls rank last; x1 and x2 tie at 2.0, the smaller id wins
    assert outs[0].kept.column("id").to_pylist() == ["x1"]
    assert set(state.column("survivor").to_pylist()) == {"x1"}


def test_survivor_does_not_depend_on_batching_or_partitions():
    texts = [f"doc {i % 7}" for i in range(60)]
    ids = [f"r{(i * 37) % 60:02d}" for i in range(60)]
    batch = pa.table({"id": ids, "text": texts})
    one, s1 = _run_stage(ExactDedup(), [batch], partitions=1)
    split = [batch.slice(0, 17), batch.slice(17, 20), batch.slice(37)]
    many, s2 = _run_stage(ExactDedup(), split, partitions=5)
    assert s1.equals(s2)
    kept_many = sorted(i for o in many for i in o.kept.column("id").to_pylist())
    assert sorted(one[0].kept.column("id").to_pylist()) == kept_many
    assert len(kept_many) == 7


def test_clusters_join_transitively_through_shared_keys():
    # a minhash-like keying: a record may carry several keys; a-b share 1, b-c share 2
    class TwoKeys(ExactDedup):
        def record_keys(self, batch):
            import numpy as np
            return np.array([1, 1, 2, 2, 3], dtype=np.uint64), np.array([0, 1, 1, 2, 3]), {}

    batch = pa.table({"id": ["a", "b", "c", "d"], "text": ["xx", "x", "xxx", "y"]})
    outs, state = _run_stage(TwoKeys(), [batch])
    assert outs[0].kept.column("id").to_pylist() == ["c", "d"]
    assert state.column("survivor").to_pylist() == ["c", "c"]


def test_resolve_of_nothing_keeps_everything():
    st = ExactDedup()
    state = st.resolve(None)
    (batch,) = keyed(pa.table({"id": ["a"], "text": ["t"]}))
    assert st.apply(batch, state).kept.num_rows == 1


def test_bad_keep_order_is_rejected_naming_the_field():
    with pytest.raises(ValidationError, match="order"):
        ExactDedup({"keep": {"order": "biggest"}})
    with pytest.raises(ValidationError, match="normalise"):
        ExactDedup({"normalise": True})


def test_exact_dedup_in_a_local_run_drops_the_planted_duplicates(recipe_factory, tmp_path):
    m = run_recipe(recipe_factory([{"stage": "exact_dedup"}],
                                  engine={"kind": "local", "workers": 1, "batch_size": 16,
                                          "shuffle_partitions": 3}), progress=False)
    kept = pa.concat_tables([pq.read_table(tmp_path / "out" / s["path"]) for s in m["shards"]])
    texts = kept.column("text").to_pylist()
    assert len(texts) == len(set(texts)) and m["counts"]["reconciled"]
    st = {s["stage"]: s for s in m["counts"]["stages"]}["exact_dedup"]
    assert st["dropped"] > 0 and set(st["dropped_by_reason"]) == {"exact_duplicate"}
    # every planted text survives exactly once
    dropped = pa.concat_tables([pq.read_table(tmp_path / "out" / f) for f in m["dropped"]])
    survivors = {d.split("survivor=")[1] for d in dropped.column("detail").to_pylist()}
    assert survivors <= {format_key(k) for k in kept.column(ROW_KEY).to_pylist()}
