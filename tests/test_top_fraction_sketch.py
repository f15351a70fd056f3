"""top_fraction's quantile-sketch method (issue 11): a weighted KLL sketch whose cut
keeps the weight it promises within its reported bound, holds O(k + log W) items,
and gives one selection on every engine; and the exact method's multi-pass merge."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_text, write_jsonl

import gristmill.selectors.top_fraction as tf
from gristmill.pipeline.recipe import RecipeError, parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import RowStage, StageParams, keep_all, merge_all
from gristmill.selectors.quantile_sketch import WeightedKLL, capacity_for
from gristmill.selectors.top_fraction import TopFraction, spill_records


def _table(rng: np.random.Generator, n: int, kind: str) -> pa.Table:
    if kind == "normal":
        scores = rng.normal(size=n)
        chars = rng.integers(0, 300, n)
    elif kind == "ties":  # few distinct scores, -0.0 and NaN among them, some empty texts
        scores = rng.choice([0.0, -0.0, 1.0, 0.5, np.nan, 2.0, -3.0], n)
        chars = rng.integers(0, 50, n)
    elif kind == "heavy":  # lognormal lengths and a few records of 5% of all the text each
        scores = rng.normal(size=n)
        chars = np.minimum(rng.lognormal(4, 1.5, n).astype(np.int64), 10**6)
        chars[rng.choice(n, 3, replace=False)] = int(chars.sum() * 0.05)
    else:  # sorted input: scores rise with the row order (an adversarial stream order)
        scores = np.arange(n, dtype=np.float64)
        chars = rng.integers(1, 100, n)
    return pa.table({"_key": pa.array(rng.permutation(n).astype(np.uint64)), "s": scores,
                     "w": chars.astype(np.int64)})


class _Weighted(TopFraction):
    """top_fraction with the weight taken from column ``w`` (no text to build)."""

    def _keys(self, batch):
        empty = pa.array([""] * batch.num_rows, pa.string())
        s, _, tie = super()._keys(batch.append_column("text", empty))
        return s, batch.column("w").to_numpy().astype(np.int64), tie


def _states(stage: TopFraction, table: pa.Table, tasks: int, batches: int = 3):
    """The state from spilled per-task summaries, as an engine builds it."""
    files = []
    for rows in np.array_split(np.arange(table.num_rows), tasks):
        parts = [stage.summarize(table.take(pa.array(b))) for b in np.array_split(rows, batches)
                 if b.size]
        summary = merge_all(stage, parts)
        if summary is not None:
            sink = io.BytesIO()
            stage.spill_summary(summary, sink)
            files.append(sink.getvalue())
    return stage.finalize_spilled([lambda b=b: io.BytesIO(b) for b in files]), files


CASES = [(kind, order, fraction) for kind in ("normal", "ties", "heavy", "sorted")
         for order, fraction in (("max", 0.3), ("min", 0.77), ("max", 0.02))]


@pytest.mark.parametrize(("kind", "order", "fraction"), CASES)
def test_sketch_keeps_the_promised_weight_within_its_reported_bound(kind, order, fraction):
    rng = np.random.default_rng(len(kind) * 7 + int(fraction * 100))
    table = _table(rng, 40_000, kind)
    params = {"column": "s", "fraction": fraction, "order": order}
    exact = _Weighted(params, seed=4)
    sketch = _Weighted({**params, "method": "sketch", "epsilon": 0.01}, seed=4)
    want, _ = _states(exact, table, tasks=5)
    got, _ = _states(sketch, table, tasks=5)
    out_e, out_s = exact.apply(table, want), sketch.apply(table, got)
    total, w_max = int(table.column("w").to_numpy().sum()), int(table.column("w").to_numpy().max())
    assert out_e.weight == (total, want["kept_weight"])  # what the manifest counts
    kept = out_s.weight[1]
    t, tau = got["error_bound_weight"], fraction * total
    assert got["method"] == "sketch" and got["total_weight"] == total
    assert 0 < t <= 0.01 * total  # compactions ran, and k was sized for epsilon
    assert got["error_bound_fraction"] == pytest.approx(t / total)
    assert got["max_record_weight"] == w_max
    assert tau - t <= kept < tau + t + w_max
    assert abs(kept - want["kept_weight"]) <= t + w_max
    assert abs(got["estimated_kept_weight"] - kept) <= t + w_max


def test_sketch_holds_o_k_plus_log_w_items_whatever_the_number_of_records():
    rng = np.random.default_rng(1)
    k = capacity_for(0.02, 1e-6)
    sizes = {}
    for n in (20_000, 400_000):
        acc = None
        for part in np.array_split(np.arange(n), 8):
            keys = rng.integers(0, 2**63, part.size, dtype=np.uint64)
            ties = rng.integers(0, 2**63, part.size, dtype=np.uint64)
            w = np.minimum(rng.lognormal(5, 2, part.size), 1e7).astype(np.int64)
            o = np.lexsort((ties, keys))
            sk = WeightedKLL.from_sorted(keys[o], ties[o], w[o], k, seed=2)
            acc = sk if acc is None else acc.merge(sk)
        sizes[n] = acc.retained()
        # below the height: sum of k (2/3)^j + 2 per level; above: at most 2k in all
        assert acc.retained() <= 5 * k + 4 * len(acc.levels)
        assert acc.error_bound(1e-6) <= 0.02 * acc.total
    assert sizes[400_000] < 20_000 / 2  # not O(n): 20x the records, fewer than 1/2 of the smaller n


def test_a_task_sketch_depends_on_its_records_not_on_their_batches_or_order():
    rng = np.random.default_rng(5)
    table = _table(rng, 6000, "ties")
    stage = _Weighted({"column": "s", "fraction": 0.4, "method": "sketch", "epsilon": 0.05})
    a_state, a_files = _states(stage, table, tasks=4, batches=1)
    b_state, b_files = _states(stage, table, tasks=4, batches=9)
    shuffled = pa.concat_tables([table.slice(1500 * t, 1500).take(
        pa.array(rng.permutation(1500))) for t in range(4)])
    c_state, c_files = _states(stage, shuffled, tasks=4, batches=5)
    assert a_files == b_files == c_files  # the spilled sketches, byte for byte
    assert a_state == b_state == c_state


def test_sketch_of_no_rows_or_of_no_weight():
    stage = _Weighted({"column": "s", "fraction": 0.5, "method": "sketch"})
    empty = stage.finalize_spilled([])
    assert empty["score"] == np.inf and empty["method"] == "sketch"
    table = pa.table({"_key": pa.array([3, 1, 2], pa.uint64()), "s": [0.5, 2.0, 1.0],
                      "w": [0, 0, 0]})
    state, _ = _states(stage, table, tasks=2)
    assert stage.apply(table, state).kept.column("s").to_pylist() == [2.0]  # as exact: the top one
    assert state == {**state, "total_weight": 0, "error_bound_weight": 0.0}


def test_sketch_parameters_need_the_sketch_method():
    with pytest.raises(ValueError, match="epsilon applies to method: sketch"):
        TopFraction({"column": "s", "fraction": 0.5, "epsilon": 0.01})
    with pytest.raises(ValueError, match="epsilon"):
        TopFraction({"column": "s", "fraction": 0.5, "method": "sketch", "epsilon": 0})


# ---------------------------------------------------------------------------
# the exact method's multi-pass merge


def _spill_files(rng: np.random.Generator, n_files: int) -> list[bytes]:
    stage = _Weighted({"column": "s", "fraction": 0.5})
    files = []
    for _ in range(n_files):
        n = int(rng.integers(0, 40))
        t = pa.table({"_key": pa.array(rng.integers(0, 2**40, n).astype(np.uint64)),
                      "s": rng.choice([0.0, -0.0, 1.0, np.nan, 2.5], n),
                      "w": rng.integers(0, 9, n)})
        sink = io.BytesIO()
        stage.spill_summary(stage.summarize(t), sink)
        files.append(sink.getvalue())
    return files


@pytest.mark.parametrize("n_files", [1, 7, 300])
def test_multi_pass_merge_is_bit_identical_to_the_single_pass_merge(n_files, monkeypatch,
                                                                    tmp_path):
    rng = np.random.default_rng(n_files)
    files = _spill_files(rng, n_files)
    openers = [lambda b=b: io.BytesIO(b) for b in files]
    monkeypatch.setattr(tf, "FAN_IN", n_files)
    single = {f: tf.select_spilled(openers, f) for f in (0.1, 0.93, 1.0)}
    # one run of every file: each record once, in the selection order
    [run] = tf.merge_runs(openers, str(tmp_path))
    with run() as f:
        recs = np.frombuffer(f.read()[16:], dtype=tf.SPILL_DTYPE)
    every = np.concatenate([np.frombuffer(b[16:], dtype=tf.SPILL_DTYPE) for b in files])
    assert (recs == every[np.lexsort((every["t"], every["k"]))]).all()
    monkeypatch.setattr(tf, "MERGE_RECORDS", 6)
    group, groups, buffered = [0], [], []  # files in the merge running, per merge, records
    merged_chunks, read_records = tf._merged_chunks, tf._read_records

    def chunks(files, rows):
        group[0] = len(files)
        groups.append(len(files))
        yield from merged_chunks(files, rows)

    monkeypatch.setattr(tf, "_merged_chunks", chunks)
    # a file's buffer, times the files merged with it: what the merge can hold at once
    monkeypatch.setattr(tf, "_read_records",
                        lambda f, n: buffered.append(n * group[0]) or read_records(f, n))
    for fan_in in (2, 3):
        monkeypatch.setattr(tf, "FAN_IN", fan_in)
        for f, want in single.items():
            assert tf.select_spilled(openers, f) == want
            # every merge takes at most FAN_IN files and buffers at most MERGE_RECORDS
            # records (one per file if there are more files): constant in the files
            assert max(groups) <= fan_in and max(buffered) <= max(6, fan_in)
            if n_files > fan_in:
                assert len(groups) > 1  # it did merge in passes
            groups.clear()
            buffered.clear()


def test_spill_records_order_is_the_selection_order():
    s = np.array([1.0, np.nan, 2.0, -0.0, 0.0])
    rec = spill_records(np.where(np.isnan(s), -np.inf, s), np.ones(5, np.int64),
                        np.arange(5, dtype=np.uint64)[::-1].copy())
    assert rec["t"].tolist() == [2, 4, 0, 1, 3]  # 2.0, 1.0, then 0.0 / -0.0 by tie, NaN last


# ---------------------------------------------------------------------------
# end to end: every engine, one selection, reported in the manifest


@pytest.fixture(scope="module")
def sketch_corpus(tmp_path_factory) -> Path:
    rng = random.Random(8)
    folder = tmp_path_factory.mktemp("sketch") / "corpus"
    for f in range(5):
        write_jsonl(folder / f"part-{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": make_text(rng, rng.randint(5, 300))}
                     for i in range(120)])
    return folder


def _run_sketch(corpus: Path, out: Path, **engine) -> tuple[dict, bytes, list]:
    body = {"name": "sketch", "seed": 6, "sources": [{"path": str(corpus)}],
            "stages": [{"stage": "text_stats"},
                       {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.4,
                        "method": "sketch", "epsilon": 0.3}],
            "output": {"path": str(out), "shard_size": "16KB"},
            "engine": {"batch_size": 32, **engine}}
    m = run_recipe(parse_recipe(body), progress=False, report=False, fresh=True)
    kept = sorted(r for s in m["shards"] for r in pq.read_table(out / s["path"])
                  .column("id").to_pylist())
    return m, (out / "artifacts" / "top_fraction" / "threshold.json").read_bytes(), kept


def test_sketch_selection_is_the_same_on_every_engine_and_reported(sketch_corpus, tmp_path):
    m, threshold, kept = _run_sketch(sketch_corpus, tmp_path / "w1", workers=1)
    sel = m["selections"]["top_fraction"]
    assert sel == {**json.loads(threshold), "selected_weight": sel["selected_weight"],
                   "selected_weight_fraction": sel["selected_weight_fraction"]}
    assert sel["method"] == "sketch" and sel["error_bound_weight"] > 0
    tau, t = 0.4 * sel["total_weight"], sel["error_bound_weight"]
    assert tau - t <= sel["selected_weight"] < tau + t + sel["max_record_weight"]
    assert sel["selected_weight_fraction"] == sel["selected_weight"] / sel["total_weight"]
    counts = {c["stage"]: c for c in m["counts"]["stages"]}["top_fraction"]
    assert counts["weight_kept"] == sel["selected_weight"] and counts["kept"] == len(kept)
    for name, engine in (("w2", {"workers": 2}), ("dask", {"kind": "dask", "workers": 2}),
                         ("beam", {"kind": "beam"})):
        m2, threshold2, kept2 = _run_sketch(sketch_corpus, tmp_path / name, **engine)
        assert (threshold2, kept2) == (threshold, kept), name
        assert m2["selections"] == m["selections"], name


def test_a_recipe_with_a_sketch_parameter_on_the_exact_method_is_refused(sketch_corpus,
                                                                         tmp_path):
    body = {"name": "bad", "sources": [{"path": str(sketch_corpus)}],
            "stages": [{"stage": "text_stats"},
                       {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.4,
                        "delta": 0.01}],
            "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(RecipeError, match="delta applies to method: sketch"):
        parse_recipe(body)


class FailWhileMarked(RowStage):
    """Fails on file 3's rows while the file ``marker`` exists: a run killed
    after tasks 0-2 spilled their sketches."""

    type_name = "fail_while_marked"

    class Params(StageParams):
        marker: str

    def process(self, batch: pa.Table):
        if Path(self.params.marker).exists() and \
                any(i.startswith("3-") for i in batch.column("id").to_pylist()):
            raise RuntimeError("killed (test)")
        return keep_all(batch)


def test_a_resumed_sketch_run_makes_the_uninterrupted_cut(sketch_corpus, tmp_path):
    marker = tmp_path / "fail"
    body = {"name": "resume", "seed": 6, "sources": [{"path": str(sketch_corpus)}],
            "stages": [{"stage": "text_stats"},
                       {"stage": f"{__name__}:FailWhileMarked", "name": "fail", "marker": str(marker)},
                       {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.4,
                        "method": "sketch", "epsilon": 0.3}],
            "output": {"path": str(tmp_path / "out"), "shard_size": "16KB"},
            "engine": {"batch_size": 32, "workers": 1}}
    reference = run_recipe(parse_recipe({**body, "output": {
        "path": str(tmp_path / "ref"), "shard_size": "16KB"}}), progress=False, report=False)
    marker.touch()
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(parse_recipe(body), progress=False, report=False)
    work = tmp_path / "out" / "_work" / "seg00"
    assert sorted(p.parent.name for p in work.glob("task-*/summary.spill")) == \
        ["task-00000", "task-00001", "task-00002"]
    marker.unlink()
    resumed = run_recipe(parse_recipe(body), progress=False, report=False)
    assert resumed["selections"] == reference["selections"]
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
