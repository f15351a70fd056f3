"""Predictive strength (PreSelect): hand-worked values, labels, and the stages on real tiny LMs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gristmill.pipeline.stage import merge_all
from gristmill.scorers.predictive import (
    PredictiveStrength,
    PreSelectLabel,
    concordant_pairs,
    max_concordant_pairs,
    model_losses,
    predictive_strength,
    preselect_labels,
)

SCORES = [10.0, 20.0, 30.0, 40.0]  # model 3 is the best on the benchmark
LOSSES = np.array([
    [4.0, 3.0, 2.0, 1.0],        # ranks the models exactly as the benchmark: 6 of 6
    [1.0, 2.0, 3.0, 4.0],        # exactly reversed: 0 of 6
    [4.0, 3.0, 1.0, 2.0],        # models 2 and 3 swapped: 5 of 6
    [2.0, 2.0, 1.0, 1.0],        # two loss ties count as not concordant: 4 of 6
    [4.0, np.nan, 2.0, 1.0],     # a missing loss: no strength
])


def test_concordant_pairs_on_hand_worked_example():
    assert concordant_pairs(LOSSES, SCORES).tolist() == [6, 0, 5, 4, -1]


def test_strength_is_normalized_by_k_choose_2():
    s = predictive_strength(LOSSES, SCORES)
    np.testing.assert_allclose(s[:4], [1.0, 0.0, 5 / 6, 4 / 6])
    assert np.isnan(s[4])


def test_model_order_does_not_change_strength():
    perm = [2, 0, 3, 1]
    np.testing.assert_array_equal(concordant_pairs(LOSSES[:, perm], np.array(SCORES)[perm]),
                                  concordant_pairs(LOSSES, SCORES))


def test_tied_benchmark_scores_cap_the_attainable_strength():
    scores = [10.0, 10.0, 20.0]
    assert max_concordant_pairs(scores) == 2
    s = predictive_strength(np.array([[3.0, 2.0, 1.0]]), scores)
    np.testing.assert_allclose(s, [2 / 3])


def test_fewer_than_two_models_is_an_error():
    with pytest.raises(ValueError, match="at least 2 models"):
        concordant_pairs(np.ones((3, 1)), [1.0])


def test_labels_take_maximal_strength_and_as_many_lowest():
    s = np.array([1.0, 0.0, 5 / 6, 4 / 6, 1.0, 0.5, 1 / 6])
    ids = [f"d{i}" for i in range(len(s))]
    assert preselect_labels(s, ids).tolist() == [1, 0, -1, -1, 1, -1, 0]


def test_label_ties_at_the_negative_cut_are_broken_by_id_hash():
    s = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    ids = ["a", "b", "c", "d", "e"]
    labels = preselect_labels(s, ids, seed=3)
    assert (labels == 1).sum() == 2 and (labels == 0).sum() == 2
    # the same documents in another order get the same labels
    perm = [4, 2, 0, 3, 1]
    again = preselect_labels(s[perm], [ids[i] for i in perm], seed=3)
    assert dict(zip([ids[i] for i in perm], again.tolist(), strict=True)) == dict(zip(ids, labels.tolist(), strict=True))


def test_positives_are_cut_to_the_number_of_negatives():
    labels = preselect_labels(np.array([1.0, 1.0, 1.0, 0.5]), ["a", "b", "c", "d"])
    assert sorted(labels.tolist()) == [-1, -1, 0, 1]
    assert labels[3] == 0


def test_equal_strength_everywhere_is_an_error():
    with pytest.raises(ValueError, match="same predictive strength"):
        preselect_labels(np.full(4, 0.5), list("abcd"))


def test_label_stage_over_batches_equals_function_api():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 7, 200) / 6
    ids = [f"r{i}" for i in range(200)]
    table = pa.table({"id": ids, "predictive_strength": s})
    stage = PreSelectLabel({}, seed=5)
    parts = [table.slice(0, 70), table.slice(70, 60), table.slice(130)]
    state = stage.finalize(merge_all(stage, [stage.summarize(b) for b in parts]))
    got = {}
    dropped = 0
    for b in parts:
        out = stage.apply(b, state)
        got.update(zip(out.kept.column("id").to_pylist(),
                       out.kept.column("preselect_label").to_pylist(), strict=True))
        dropped += out.num_dropped
    expected = preselect_labels(s, ids, seed=5, salt="preselect_label")
    assert got == {i: int(v) for i, v in zip(ids, expected, strict=True) if v >= 0}
    assert dropped == int((expected < 0).sum())
    assert sum(v == 1 for v in got.values()) == sum(v == 0 for v in got.values()) > 0


def test_stage_rejects_models_with_equal_scores():
    with pytest.raises(ValueError, match="scores are all equal"):
        PredictiveStrength({"models": [{"path": "a", "score": 1}, {"path": "b", "score": 1}]})


def test_stage_rejects_unknown_parameter():
    with pytest.raises(ValueError, match="extra"):
        PredictiveStrength({"models": [{"path": "a", "score": 1}, {"path": "b", "score": 2}],
                            "modle": 1})


# ---------------------------------------------------------------- real tiny LMs


TEXTS = ["the mill grinds grain into flour every morning",
         "water turns the wheel and the wheel turns the stone",
         "zq xv jk qq",
         "",
         "a farmer brings barley and oats to the market\nand sells them by the sack"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronization on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

    root = tmp_path_factory.mktemp("preselect_models")
    build_tokenizer(TEXTS * 20, vocab_size=300, path=root / "tok")
    paths = []
    for k, width in enumerate((16, 32, 48)):
        paths.append(str(build_tiny_lm(root / "tok", root / f"m{k}", n_layer=1, n_embd=width,
                                       n_head=2, n_positions=64, seed=k)))
    return paths


def test_stage_adds_strength_from_per_model_bpc(tiny_models):
    from gristmill.scorers.likelihood import score_texts

    models = [{"path": p, "score": float(s)} for p, s in zip(tiny_models, (30, 10, 20), strict=True)]
    stage = PredictiveStrength({"models": models, "max_length": 16, "stride": 8,
                                "device": "cpu"}, name="ps")
    out = stage.process(pa.table({"id": [str(i) for i in range(len(TEXTS))], "text": TEXTS}))
    kept = out.kept
    bpc = np.array([[np.nan if v is None else v for v in row]
                    for row in kept.column("ps_bpc").to_pylist()])
    for k, (m, t) in enumerate(stage._loaded):
        ref = score_texts(m, t, TEXTS, max_length=16, stride=8).bpc
        np.testing.assert_allclose(bpc[:, k], ref, rtol=1e-6)
    expected = predictive_strength(bpc, [30, 10, 20])
    s = kept.column("ps").to_pylist()
    assert s[3] is None  # the empty text has no bits per character
    np.testing.assert_allclose([v for i, v in enumerate(s) if i != 3],
                               np.delete(expected, 3))
    assert kept.column("ps_concordant").to_pylist()[0] == concordant_pairs(bpc, [30, 10, 20])[0]
    np.testing.assert_allclose(model_losses([(p, 0) for p in tiny_models], TEXTS[:2],
                                            max_length=16, stride=8, device="cpu"), bpc[:2])
