"""OTDD (label-aware OT) and Projektor's per-sample OT, checked against POT's solvers."""

from __future__ import annotations

import numpy as np
import ot
import pytest

from gristmill.selectors.ot_mixture import (
    SampledMixtureOT,
    class_wasserstein,
    dataset_distance,
    mixture_point_weights,
    otdd_cost_matrix,
    sample_counts,
    sinkhorn_divergence,
    sinkhorn_divergence_costs,
)


def _blobs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points, half around (-2, 0) and half around (2, 0); returns points and blob ids."""
    blob = np.repeat([0, 1], n // 2)
    X = rng.normal(scale=0.5, size=(n, 2)) + np.where(blob[:, None] == 0, [-2.0, 0.0], [2.0, 0.0])
    return X, blob


def _otdd_by_hand(X, y, Y, z) -> float:
    """OTDD from POT alone: inner ot.emd2 per class pair, outer ot.emd2."""
    c1, c2 = np.unique(y), np.unique(z)
    W = np.array([[ot.emd2([], [], ot.dist(X[y == a], Y[z == b])) for b in c2] for a in c1])
    M = ot.dist(X, Y) + W[np.searchsorted(c1, y)][:, np.searchsorted(c2, z)]
    return float(ot.emd2([], [], M))


def test_otdd_separates_sources_that_differ_only_in_class_priors_where_plain_ot_does_not():
    # Classes share their conditionals across sources: class 0 = left blob, class 2 =
    # right blob, class 1 = both blobs half and half. Source A draws classes 0 and 2
    # (priors 1/2, 0, 1/2); source B draws class 1 only (priors 0, 1, 0). Both have the
    # same feature distribution (here even the same points); the target is labelled
    # like A.
    rng = np.random.default_rng(0)
    X, blob = _blobs(rng, 60)
    labels_a = np.where(blob == 0, 0, 2)
    labels_b = np.ones_like(blob)
    Y, tblob = _blobs(rng, 40)
    target_labels = np.where(tblob == 0, 0, 2)

    plain_a = dataset_distance(X, Y, labels_a, target_labels).value
    plain_b = dataset_distance(X, Y, labels_b, target_labels).value
    otdd_a = dataset_distance(X, Y, labels_a, target_labels, cost="otdd").value
    otdd_b = dataset_distance(X, Y, labels_b, target_labels, cost="otdd").value

    assert plain_a == pytest.approx(plain_b, rel=1e-12)          # label-free OT: no difference
    assert plain_a == pytest.approx(ot.emd2([], [], ot.dist(X, Y)), rel=1e-10)
    assert otdd_a == pytest.approx(_otdd_by_hand(X, labels_a, Y, target_labels), rel=1e-9)
    assert otdd_b == pytest.approx(_otdd_by_hand(X, labels_b, Y, target_labels), rel=1e-9)
    # B's class 1 is 4 units (squared: 8 on average) from either target class.
    assert otdd_b - otdd_a > 5.0
    assert otdd_a < plain_a + 1.0


def test_class_wasserstein_is_exact_w2_between_class_conditionals():
    X1 = np.array([[0.0], [2.0], [10.0]])
    y1 = np.array([0, 0, 1])
    X2 = np.array([[1.0], [11.0], [13.0]])
    y2 = np.array([5, 7, 7])
    c1, c2, W = class_wasserstein(X1, y1, X2, y2)
    np.testing.assert_array_equal(c1, [0, 1])
    np.testing.assert_array_equal(c2, [5, 7])
    # W2^2({0, 2}, {1}) = (1 + 1) / 2; ({0, 2}, {11, 13}) = (121 + 121) / 2;
    # ({10}, {1}) = 81; ({10}, {11, 13}) = (1 + 9) / 2.
    np.testing.assert_allclose(W, [[1.0, 121.0], [81.0, 5.0]])
    M = otdd_cost_matrix(X1, y1, X2, y2)
    assert M[0, 0] == pytest.approx(1.0 + 1.0)
    assert M[2, 2] == pytest.approx(9.0 + 5.0)


def test_otdd_sinkhorn_is_zero_on_identical_sets_and_near_exact_for_small_reg():
    rng = np.random.default_rng(1)
    X, blob = _blobs(rng, 40)
    y = blob * 3
    Y, tblob = _blobs(rng, 30)
    z = tblob
    assert dataset_distance(X, X, y, y, cost="otdd", method="sinkhorn").value == pytest.approx(0, abs=1e-6)
    exact = dataset_distance(X, Y, y, z, cost="otdd", method="exact").value
    soft = dataset_distance(X, Y, y, z, cost="otdd", method="sinkhorn", reg=0.002).value
    assert soft == pytest.approx(exact, rel=0.05)


def test_sample_counts_round_to_n_by_largest_remainder():
    np.testing.assert_array_equal(sample_counts([0.5, 0.3, 0.2], 10), [5, 3, 2])
    np.testing.assert_array_equal(sample_counts([1 / 3, 1 / 3, 1 / 3], 100), [34, 33, 33])
    np.testing.assert_array_equal(sample_counts([0.26, 0.74, 0.0], 3), [1, 2, 0])
    with pytest.raises(ValueError, match="probability"):
        sample_counts([0.5, 0.6], 10)


def _streams(rng, n=80):
    centres = ([0.0, 0.0], [3.0, 0.0], [0.0, 3.0])
    streams = [rng.normal(size=(n, 2)) + c for c in centres]
    labels = [rng.integers(0, 3, size=n) for _ in centres]
    target = rng.normal(size=(50, 2)) + [1.0, 1.0]
    target_labels = rng.integers(0, 3, size=50)
    return streams, labels, target, target_labels


def test_sampled_ot_is_exact_ot_of_the_sample_drawn_at_its_size():
    rng = np.random.default_rng(2)
    streams, labels, target, target_labels = _streams(rng)
    sot = SampledMixtureOT(streams, target, labels, target_labels)
    p = np.array([0.5, 0.3, 0.2])
    values = {}
    for n in (20, 40):
        counts = sample_counts(p, n)
        X = np.concatenate([s[:c] for s, c in zip(streams, counts, strict=True)])
        values[n] = sot.distance(p, n)[0]
        assert values[n] == pytest.approx(ot.emd2([], [], ot.dist(X, target)), rel=1e-10)
    # The feature depends on N: the pilots at N0 and N1 do not share it.
    assert values[20] != pytest.approx(values[40], rel=1e-3)
    # The OTDD option is POT's OT with the OTDD cost on the same sample.
    sot_dd = SampledMixtureOT(streams, target, labels, target_labels, cost="otdd")
    counts = sample_counts(p, 40)
    X = np.concatenate([s[:c] for s, c in zip(streams, counts, strict=True)])
    y = np.concatenate([s[:c] for s, c in zip(labels, counts, strict=True)])
    assert sot_dd.distance(p, 40)[0] == pytest.approx(_otdd_by_hand(X, y, target, target_labels), rel=1e-9)


@pytest.mark.parametrize("cost", ["euclidean", "otdd"])
def test_sampled_ot_gradient_is_derivative_of_reweighted_sample(cost):
    rng = np.random.default_rng(3)
    streams, labels, target, target_labels = _streams(rng)
    sot = SampledMixtureOT(streams, target, labels, target_labels, cost=cost, method="sinkhorn",
                           reg=0.05, tol=1e-13)
    p = np.array([0.45, 0.35, 0.2])
    n = 40
    _, grad = sot.distance(p, n)
    X, src, lab = sot.sample(p, n)
    q = sample_counts(p, n) / n  # the mixture the sample realizes
    if cost == "otdd":
        M = otdd_cost_matrix(X, lab, target, target_labels)
        M_aa = otdd_cost_matrix(X, lab, X, lab)
        M_bb = otdd_cost_matrix(target, target_labels, target, target_labels)
        np.fill_diagonal(M_aa, 0)
        np.fill_diagonal(M_bb, 0)

        def value(w):
            return sinkhorn_divergence_costs(M, M_aa, M_bb, a=mixture_point_weights(src, w), reg=0.05,
                                             tol=1e-13, max_iter=100_000).value
    else:
        def value(w):
            return sinkhorn_divergence(X, target, a=mixture_point_weights(src, w), reg=0.05, tol=1e-13,
                                       max_iter=100_000).value
    h = 1e-6
    d = np.array([1.0, -1.0, 0.0])
    fd = (value(q + h * d) - value(q - h * d)) / (2 * h)
    assert fd == pytest.approx(grad[0] - grad[1], rel=1e-4)


def test_absent_source_gradient_is_mean_c_transform_of_its_next_points():
    rng = np.random.default_rng(4)
    streams, labels, target, target_labels = _streams(rng)
    sot = SampledMixtureOT(streams, target, probe=8)
    p = np.array([0.6, 0.4, 0.0])
    value, grad = sot.distance(p, 30)
    X, _, _ = sot.sample(p, 30)
    _, log = ot.emd(np.full(30, 1 / 30), np.full(50, 1 / 50), ot.dist(X, target), log=True)
    g = log["v"]
    expect = (ot.dist(streams[2][:8], target) - g[None, :]).min(axis=1).mean()
    assert grad[2] == pytest.approx(expect, rel=1e-9)
    assert value == pytest.approx(log["cost"], rel=1e-10)
