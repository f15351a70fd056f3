"""Bounded memory at any corpus size (issue 11): the spilled top fraction, per-file
drop lists and shuffle partitions chosen from the input size give the results of
the in-memory versions."""

from __future__ import annotations

import hashlib
import io
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_text, write_jsonl

import gristmill.selectors.top_fraction as tf
from gristmill.pipeline import droplists
from gristmill.pipeline.droplists import DropLists, write_drop_lists
from gristmill.pipeline.execution import shuffle_partitions_for
from gristmill.pipeline.observe import chosen_clusters
from gristmill.pipeline.recipe import parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import KEY_POS_BITS, merge_all
from gristmill.selectors.dedup import ExactDedup
from gristmill.selectors.minhash import MinHashDedup
from gristmill.selectors.top_fraction import TopFraction, key_score, score_key


def test_score_key_sorts_in_selection_order_and_inverts() -> None:
    s = np.array([np.inf, 3.5, 1.0, 0.0, -0.0, -1e-300, -2.0, -np.inf])
    k = score_key(s)
    assert (np.diff(k.astype(object)) >= 0).all()  # ascending keys = descending scores
    assert k[3] == k[4]  # -0.0 is 0.0, as the in-memory comparison has it
    np.testing.assert_array_equal(key_score(k), s + 0.0)


@pytest.mark.parametrize("trial", range(12))
def test_top_fraction_from_spilled_files_equals_the_in_memory_selection(trial, monkeypatch):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 3000))
    stage = TopFraction({"column": "s", "fraction": float(rng.uniform(0.01, 1.0)),
                         "order": ["max", "min"][trial % 2],
                         "by": ["chars", "rows"][trial // 2 % 2]}, seed=trial)
    if trial % 3:  # few distinct scores: many ties, broken by the row-key hash
        scores = rng.choice([0.0, -0.0, 1.0, 0.5, np.nan, 2.0, -3.0], n)
    else:
        scores = rng.normal(size=n)
    texts = ["x" * int(c) for c in rng.integers(0, 40, n)]
    table = pa.table({"_key": pa.array(rng.permutation(n).astype(np.uint64)), "s": scores,
                      "text": texts})
    # tasks of random sizes, some empty; each batch is summarized, a task merges its own
    cuts = np.sort(rng.integers(0, n, int(rng.integers(0, 9))))
    summaries = []
    for rows in np.split(np.arange(n), cuts):
        batches = [stage.summarize(table.take(pa.array(b)))
                   for b in np.array_split(rows, 3) if b.size]
        summaries.append(merge_all(stage, batches))
    want = stage.finalize(merge_all(stage, summaries))
    files = []
    for s in summaries:
        if s is not None:
            sink = io.BytesIO()
            stage.spill_summary(s, sink)
            files.append(sink.getvalue())
    # a tiny merge buffer: many rounds, every chunk boundary exercised
    monkeypatch.setattr(tf, "MERGE_RECORDS", int(rng.integers(1, 64)))
    monkeypatch.setattr(tf, "FAN_IN", int(rng.integers(2, 5)))  # and merges in passes
    got = stage.finalize_spilled([lambda b=b: io.BytesIO(b) for b in files])
    assert got == want
    kept_mem = stage.apply(table, want).kept.column("_key").to_pylist()
    assert stage.apply(table, got).kept.column("_key").to_pylist() == kept_mem


def test_top_fraction_with_no_rows_spills_nothing_and_keeps_nothing() -> None:
    stage = TopFraction({"column": "s", "fraction": 0.5})
    assert stage.finalize_spilled([]) == stage.finalize(None)


def _keyed_corpus(n_files: int, per_file: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    pool = [make_text(rng, 40) for _ in range(30)]
    keys, texts = [], []
    for f in range(n_files):
        for line in range(1, per_file + 1):
            keys.append((f << KEY_POS_BITS) | line)
            texts.append(rng.choice(pool) if rng.random() < 0.4 else make_text(rng, 40))
    return pa.table({"_key": pa.array(keys, pa.uint64()),
                     "id": [f"r{i}" for i in range(len(keys))], "text": texts})


@pytest.mark.parametrize("batch_rows", [1, 3, 1000])
def test_drop_lists_read_per_file_give_the_same_kept_and_dropped_rows(tmp_path, batch_rows,
                                                                       monkeypatch):
    corpus = _keyed_corpus(n_files=5, per_file=60, seed=batch_rows)
    stage = ExactDedup()
    state = stage.resolve(stage.reduce(stage.keys(corpus)))
    assert state.num_rows > 20
    lists = write_drop_lists(state, tmp_path / "drops", chosen_clusters(state, 0), batch_rows)
    assert isinstance(lists, DropLists) and lists.num_rows == state.num_rows
    # one file per input file with drops, each sorted by row key
    for f, firsts in lists.firsts.items():
        part = pa.ipc.open_file(pa.memory_map(str(lists.path(f)))).read_all()
        keys = part.column("_key").to_numpy()
        assert (keys >> KEY_POS_BITS == f).all() and (np.diff(keys.astype(np.int64)) > 0).all()
        assert firsts == keys[::batch_rows].tolist()
    monkeypatch.setattr(droplists, "CACHED_BATCHES", 2)
    monkeypatch.setattr(droplists, "_BATCHES", OrderedDict())  # none from earlier tests
    for size in (7, 60, 300):  # batches within a file, across files, the whole corpus
        for s in range(0, corpus.num_rows, size):
            batch = corpus.slice(s, size)
            want, got = stage.apply(batch, state), stage.apply(batch, lists)
            assert got.kept.equals(want.kept)
            assert got.dropped.equals(want.dropped)
            assert len(droplists._BATCHES) <= 2
    # a batch reads only the record batches whose key range can hold its keys
    one = corpus.slice(61, 5)  # lines 2..6 of file 1
    part = lists.rows_for(one.column("_key").to_numpy())
    in_file_1 = state.filter(pa.compute.equal(
        pa.compute.shift_right(state.column("_key"), KEY_POS_BITS), 1))
    assert part.num_rows <= max(batch_rows * 2, 1) or part.num_rows <= in_file_1.num_rows
    assert set(part.column("_key").to_numpy() >> KEY_POS_BITS) <= {1}


def test_drop_lists_with_no_drops_keep_everything(tmp_path) -> None:
    corpus = _keyed_corpus(n_files=2, per_file=5, seed=3)
    lists = write_drop_lists(ExactDedup().resolve(None), tmp_path / "d", {})
    assert lists.firsts == {} and ExactDedup().apply(corpus, lists).kept.equals(corpus)


def test_shuffle_partitions_grow_with_the_input_bytes_not_the_workers() -> None:
    mib = 1 << 20
    assert [shuffle_partitions_for(b) for b in (0, 1, 32 * mib, 32 * mib + 1, 200 * mib,
                                                1600 * mib)] == [1, 1, 1, 2, 7, 50]


def test_minhash_state_does_not_depend_on_the_partition_count() -> None:
    corpus = _keyed_corpus(n_files=4, per_file=80, seed=9)
    stage = MinHashDedup({"threshold": 0.7, "ngram": 3})
    keys = stage.keys(corpus)
    k = keys.column("key").to_numpy()
    states = []
    for parts in (1, 2, 7, 31):
        reduced = [stage.reduce(keys.filter(pa.array(k % parts == p))) for p in range(parts)]
        states.append(stage.resolve(pa.concat_tables(reduced)))
    assert states[0].num_rows > 0
    for s in states[1:]:
        assert s.equals(states[0])


def _dedup_corpus(folder: Path) -> Path:
    rng = random.Random(4)
    pool = [make_text(rng, 80) for _ in range(8)]
    for f in range(4):
        recs = []
        for i in range(40):
            u = rng.random()
            text = rng.choice(pool) if u < 0.3 else make_text(rng, rng.randint(20, 120))
            if 0.3 <= u < 0.45:
                words = rng.choice(pool).split(" ")
                words[rng.randrange(len(words))] = "changed"
                text = " ".join(words)
            recs.append({"id": f"{f}-{i}", "text": text})
        write_jsonl(folder / f"part-{f}.jsonl", recs)
    return folder


def _run(corpus: Path, out: Path, **engine) -> tuple[dict, str]:
    body = {"name": "bounded", "seed": 2, "sources": [{"path": str(corpus)}],
            "stages": [{"stage": "exact_dedup"},
                       {"stage": "minhash_dedup", "threshold": 0.7, "ngram": 3},
                       {"stage": "text_stats"},
                       {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.6}],
            "output": {"path": str(out), "shard_size": "8KB", "write_dropped": True},
            "engine": {"batch_size": 16, **engine}}
    m = run_recipe(parse_recipe(body), progress=False, report=False, fresh=True)
    h = hashlib.sha256()
    for rel in [s["path"] for s in m["shards"]] + list(m["dropped"]):
        h.update((out / rel).read_bytes())
    h.update((out / "artifacts" / "top_fraction" / "threshold.json").read_bytes())
    return m, h.hexdigest()


def test_output_is_the_same_with_automatic_and_explicit_shuffle_partitions(tmp_path) -> None:
    corpus = _dedup_corpus(tmp_path / "corpus")
    m_auto, auto = _run(corpus, tmp_path / "auto", workers=1)
    _, five = _run(corpus, tmp_path / "five", workers=2, shuffle_partitions=5)
    assert auto == five
    drops = {c["stage"]: c["dropped"] for c in m_auto["counts"]["stages"]}
    assert drops["exact_dedup"] > 0 and drops["minhash_dedup"] > 0
