"""OT distances, dual-potential gradients, the Projektor predictor and optimizer."""

from __future__ import annotations

import numpy as np
import ot
import pyarrow as pa
import pytest
import torch

from gristmill.pipeline.registry import stage_class
from gristmill.scorers.embeddings import Embeddings, HashedNgramEmbedder, embedding_matrix
from gristmill.selectors.ot_mixture import (
    MixtureOT,
    ProjektorPredictor,
    ScalingPredictor,
    _Kernel,
    calibrated_gradient,
    cost_matrix,
    exact_ot,
    extrapolate,
    mixture_gradient,
    optimize_mixture,
    ot_distance,
    project_simplex,
    sinkhorn_divergence,
)


@pytest.fixture
def clouds():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    Y = rng.normal(size=(40, 3)) + 0.5
    a = rng.random(30)
    b = rng.random(40)
    return X, Y, a / a.sum(), b / b.sum()


def test_exact_distance_equals_pot_emd2(clouds):
    X, Y, a, b = clouds
    r = ot_distance(X, Y, a, b, method="exact")
    assert r.value == pytest.approx(ot.emd2(a, b, ot.dist(X, Y)), rel=1e-10)
    assert ot_distance(X, Y).value == pytest.approx(ot.emd2([], [], ot.dist(X, Y)), rel=1e-10)


def test_exact_dual_potential_matches_finite_difference(clouds):
    X, Y, a, b = clouds
    M = ot.dist(X, Y)
    r = exact_ot(X, Y, a, b)
    h = 1e-7
    for i, k in ((3, 7), (0, 29), (12, 5)):
        d = np.zeros_like(a)
        d[i], d[k] = 1.0, -1.0
        fd = (ot.emd2(a + h * d, b, M) - ot.emd2(a - h * d, b, M)) / (2 * h)
        assert fd == pytest.approx(r.f[i] - r.f[k], rel=1e-5, abs=1e-7)


def test_sinkhorn_plan_matches_pot_sinkhorn(clouds):
    X, Y, a, b = clouds
    M = cost_matrix(X, Y)
    eps = 0.1
    kernel = _Kernel(M.clone(), eps)
    at, bt = torch.as_tensor(a), torch.as_tensor(b)
    f, g, _, _ = kernel.solve(at, bt, tol=1e-12, max_iter=5000)
    plan = a[:, None] * b[None, :] * np.exp((f.numpy()[:, None] + g.numpy()[None, :] - M.numpy()) / eps)
    ref = ot.sinkhorn(a, b, M.numpy(), eps, stopThr=1e-12, numItermax=5000)
    np.testing.assert_allclose(plan, ref, atol=1e-9)


def test_sinkhorn_gradient_matches_finite_difference(clouds):
    X, Y, a, b = clouds
    r = sinkhorn_divergence(X, Y, a, b, reg=0.05, tol=1e-13, max_iter=20000)
    h = 1e-6
    for i, k in ((3, 7), (1, 20)):
        d = np.zeros_like(a)
        d[i], d[k] = 1.0, -1.0
        up = sinkhorn_divergence(X, Y, a + h * d, b, reg=0.05, tol=1e-13, max_iter=20000)
        dn = sinkhorn_divergence(X, Y, a - h * d, b, reg=0.05, tol=1e-13, max_iter=20000)
        # eps is relative to the mean cost, which does not depend on a.
        assert (up.value - dn.value) / (2 * h) == pytest.approx(r.f[i] - r.f[k], rel=1e-4)


def test_debiased_sinkhorn_is_zero_on_identical_sets_and_near_exact_for_small_eps(clouds):
    X, Y, _, _ = clouds
    assert sinkhorn_divergence(X, X, tol=1e-10).value == pytest.approx(0.0, abs=1e-6)
    exact = exact_ot(X, Y).value
    assert sinkhorn_divergence(X, Y, reg=0.005, tol=1e-9, max_iter=50_000).value == pytest.approx(
        exact, rel=0.05)


def test_mixture_gradient_matches_finite_difference_in_p():
    rng = np.random.default_rng(1)
    # Pool sizes and ratios chosen so that no partial sums of point weights
    # tie (a degenerate LP has several duals and only one-sided derivatives).
    pools = [rng.normal(size=(n, 2)) + c for n, c in ((13, [0, 0]), (17, [2, 0]), (11, [0, 2]))]
    target = rng.normal(size=(23, 2)) + [1, 1]
    for method in ("exact", "sinkhorn"):
        mot = MixtureOT(pools, target, method=method, tol=1e-13)
        p = np.array([0.47, 0.31, 0.22])
        _, grad = mot.distance(p)
        h = 1e-6
        d = np.array([1.0, -1.0, 0.0])
        fd = (mot.distance(p + h * d)[0] - mot.distance(p - h * d)[0]) / (2 * h)
        assert fd == pytest.approx(grad[0] - grad[1], rel=1e-4), method


def test_calibrated_gradient_is_directional_derivative_along_proportional_shift():
    f = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    sources = np.array([0, 0, 1, 1, 1])
    g = mixture_gradient(f, sources, 2)
    np.testing.assert_allclose(g, [1.5, 11.0])
    # source 0: mean 1.5 minus (2/3) * sum of others / 2 = 1.5 - 11
    np.testing.assert_allclose(calibrated_gradient(f, sources, 2), [1.5 - 11.0, 11.0 - 1.5])


def _synthetic_predictor() -> ProjektorPredictor:
    return ProjektorPredictor(b0=0.8, b1=np.array([0.3, -0.2]), b2=np.array([0.5, 0.1]),
                              c0=1.5, c1=np.array([-0.4, 0.2]), c2=np.array([0.6, -0.3]))


def test_predictor_fit_recovers_known_coefficients():
    rng = np.random.default_rng(2)
    P = rng.dirichlet(np.ones(3), size=60)
    ot_values = rng.uniform(0.5, 2.0, size=60)
    truth = _synthetic_predictor()
    y = truth.predict(P, ot_values)
    fit = ProjektorPredictor.fit(P, ot_values, y)
    assert fit.b0 == pytest.approx(0.8) and fit.c0 == pytest.approx(1.5)
    for name in ("b1", "b2", "c1", "c2"):
        np.testing.assert_allclose(getattr(fit, name), getattr(truth, name), atol=1e-8)


def test_predictor_gradient_matches_finite_difference():
    pred = _synthetic_predictor()
    p = np.array([0.2, 0.5, 0.3])
    ot_grad = np.array([0.7, -0.1, 0.4])

    def value(q):
        # OT linear in p around p with the given gradient.
        return pred.predict(q, 1.2 + ot_grad @ (q - p))[0]

    g = pred.gradient(p, 1.2, ot_grad)
    h = 1e-6
    for i in range(2):
        d = np.zeros(3)
        d[i], d[2] = 1.0, -1.0
        fd = (value(p + h * d) - value(p - h * d)) / (2 * h)
        assert fd == pytest.approx(g[i] - g[2], rel=1e-6)


def test_extrapolation_is_the_line_through_both_pilots_in_log_n():
    # y = 3 - 0.5 log N is reproduced exactly at any N.
    def y(n):
        return 3 - 0.5 * np.log(n)

    assert extrapolate(y(1000), y(1500), 1000, 1500, 20_000) == pytest.approx(y(20_000))
    assert extrapolate(y(1000), y(1500), 1000, 1500, 1000) == pytest.approx(y(1000))
    with pytest.raises(ValueError, match="0 < n0 < n1"):
        extrapolate(1.0, 2.0, 1500, 1000, 10)


def test_scaling_predictor_projects_each_mixture():
    pred0 = _synthetic_predictor()
    pred1 = ProjektorPredictor(b0=0.6, b1=pred0.b1, b2=pred0.b2, c0=1.2, c1=pred0.c1, c2=pred0.c2)
    sp = ScalingPredictor(pred0, pred1, 1000, 2000)
    p = np.array([[0.3, 0.3, 0.4]])
    expected = extrapolate(pred0.predict(p, 1.0), pred1.predict(p, 1.0), 1000, 2000, 8000)
    np.testing.assert_allclose(sp.predict(p, 1.0, 1.0, 8000), expected)


def test_projected_gradient_stays_on_simplex_and_improves_objective():
    target = np.array([0.7, 0.25, 0.05])

    def objective(p):
        return float(((p - target) ** 2).sum()), 2 * (p - target)

    res = optimize_mixture(objective, [1 / 3, 1 / 3, 1 / 3], steps=40, lr=0.2)
    values = [v for _, v in res.history]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))
    for p, _ in res.history:
        assert p.min() >= 0 and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(res.p, target, atol=1e-3)


def test_projected_gradient_on_ot_moves_mass_toward_the_source_like_the_target():
    rng = np.random.default_rng(3)
    pools = [rng.normal(size=(40, 2)) + c for c in ([0, 0], [4, 0], [0, 4])]
    target = rng.normal(size=(60, 2)) + [4, 0]
    mot = MixtureOT(pools, target, method="exact")
    res = optimize_mixture(mot.distance, [1 / 3, 1 / 3, 1 / 3], steps=15, lr=0.3)
    assert res.value < res.history[0][1]
    assert res.p[1] > 0.9


def test_project_simplex_clips_and_normalizes():
    np.testing.assert_allclose(project_simplex(np.array([2.0, 0.0, -1.0])), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(project_simplex(np.array([0.5, 0.5, 0.5])), [1 / 3] * 3)


def test_hashed_embeddings_are_deterministic_normalized_and_topical():
    e = HashedNgramEmbedder(dim=512)
    v = e.embed(["the cat sat on the mat", "the cat sat on a mat", "stock markets fell sharply"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v, HashedNgramEmbedder(dim=512).embed(
        ["the cat sat on the mat", "the cat sat on a mat", "stock markets fell sharply"]))
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_embeddings_stage_adds_fixed_size_vector_column():
    assert stage_class("embeddings") is Embeddings
    stage = Embeddings({"dim": 32}, name="emb")
    out = stage.process(pa.table({"id": ["a", "b"], "text": ["hello world", None]}))
    m = embedding_matrix(out.kept, "emb")
    assert m.shape == (2, 32)
    assert float(np.linalg.norm(m[0])) == pytest.approx(1.0, rel=1e-5)
    assert not m[1].any()


def test_sinkhorn_gradient_is_finite_when_a_source_has_ratio_zero():
    rng = np.random.default_rng(4)
    pools = [rng.normal(size=(n, 2)) + c for n, c in ((13, [0, 0]), (17, [2, 0]), (11, [0, 2]))]
    target = rng.normal(size=(23, 2)) + [0, 2]
    mot = MixtureOT(pools, target, method="sinkhorn", tol=1e-10)
    value, grad = mot.distance(np.array([0.5, 0.5, 0.0]))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # The target sits on source 2: moving mass there lowers OT.
    assert grad[2] < grad[0] and grad[2] < grad[1]


def test_sentence_embedder_loads_a_local_model_and_normalizes(tmp_path):
    from transformers import BertConfig, BertModel

    from gristmill.scorers.embeddings import SentenceEmbedder
    from gristmill.trainers.tiny import build_tokenizer

    texts = ["the cat sat on the mat", "stock markets fell", "a dog ran"] * 10
    tok = build_tokenizer(texts, vocab_size=300, path=tmp_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(tmp_path))
    emb = SentenceEmbedder(str(tmp_path), batch_size=2)
    v = emb.embed(texts[:3])
    assert v.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    # Mean pooling ignores padding: a text embeds the same alone or in a padded batch.
    np.testing.assert_allclose(emb.embed([texts[2]])[0], v[2], atol=1e-5)
