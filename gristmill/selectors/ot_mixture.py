"""Mixture performance prediction and optimization with optimal transport.

After Kang, Just, Sahu and Jia, "Performance Scaling via Optimal
Transport: Enabling Data Selection from Partially Revealed Sources"
(Projektor, NeurIPS 2023; code: github.com/reds-lab/projektor).

A training set is a mixture of m sources with ratios p on the simplex. Its
distance to the target (validation) data is measured by optimal transport in
an embedding space:

    OT(p) = min_{P in Pi(a, b)} <P, M> .

As in the paper and its code, OT is computed on each pilot sample itself
(``SampledMixtureOT``): the training set D(N, p) of N points, n_i = N p_i
from source i, uniform weights a_j = 1/N, so the feature depends on N. Two
ground costs:

* ``cost="euclidean"`` (label-free OT): M_jk = ||x_j - y_k||^2;
* ``cost="otdd"`` (label-aware, the distance the paper uses): OTDD of
  Alvarez-Melis and Fusi (2020), M_jk = ||x_j - y_k||^2 + W_2^2(alpha_{l_j},
  beta_{l_k}), the second term the exact OT between the class-conditionals
  of the two points' labels (``class_wasserstein``).

``MixtureOT`` is the older label-free variant that reweights fixed
per-source pools to p (a_j = p_s / n_s) instead of drawing a sample; it is
deterministic in p but does not depend on N.

Up to ``exact_max`` points per side this is solved exactly with POT's network
simplex (``ot.emd``); beyond, by the debiased Sinkhorn divergence
(Feydy et al. 2019, "Interpolating between Optimal Transport and MMD using
Sinkhorn Divergences")

    S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2 ,

with OT_eps(a, b) = min_P <P, M> + eps KL(P | a x b) = <a, f> + <b, g> at the
optimal dual potentials (f, g).

Gradient w.r.t. the mixture (the paper's optimization step, after LAVA): the dual
potential f is the gradient of OT w.r.t. a (up to a constant), so with
a_j = p_s / n_s (raising p_s scales up the weights of source s's points, in
a pool or in the sample)

    d OT / d p_i = (1 / n_i) sum_{j in source i} f_j         (exact, reweighting)

and for the debiased divergence f is replaced by f_ab - f_aa. The paper writes
the *calibrated* form (1/n_i)(sum_{j in i} f_j - n_i/(N - n_i) sum_{j not in i} f_j),
the derivative along "raise p_i, lower the others in proportion". With
g_i the plain entries and g_bar = sum_k p_k g_k, it equals (g_i - g_bar) / (1 - p_i):
the centred plain gradient with coordinate i stretched by 1 / (1 - p_i), the
same signs but not the same direction. Projected gradient steps here use the
plain form, the exact gradient on the simplex (``calibrated_gradient`` gives
the other). The paper's notebook steps along the N0 gradient with a decaying
rate 0.9^t instead of the projected one it computes; we follow the text
(gradient of the projected predictor) with backtracking.

Performance predictor at one data size N (the paper's "pseudo-quadratic" form):

    L(p) = (b_0 + sum_{i<m} (b2_i p_i^2 + b1_i p_i)) OT(p)
           + c_0 + sum_{i<m} (c2_i p_i^2 + c1_i p_i)

Paper text vs code: the text sums over all m sources and carries b_0, c_0 in
every term; with sum_i p_i = 1 those columns are collinear, and the paper's
code fits over the first m - 1 ratios and leaves out the c2 p_i^2 terms. We
follow the code's m - 1 free ratios (so the least squares is well posed) and
the text's c2 terms (the form the paper states). The gradient is the exact
derivative of this L; the paper's printed dL/dp_i keeps only the i-th term of
the OT coefficient, which we do not copy.

Parameter-free projection from pilot sizes N0 < N1 to N (the paper's projection):

    L(N, p) = [log(N/N0) L(N1, p) - log(N/N1) L(N0, p)] / log(N1/N0) ,

the line through both pilots in log N; its gradient is the same combination
of the two gradients. The mixture is optimized by projected gradient on the
simplex, p <- proj_simplex(p - eta grad), with backtracking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ot
import torch
from tqdm.auto import tqdm

EXACT_MAX = 5000
OVERRELAX = 1.5


@dataclass
class OTResult:
    """An OT distance and its dual potentials.

    Attributes
    ----------
    value : float
        OT(a, b) (exact) or the debiased Sinkhorn divergence S_eps(a, b).
    f : numpy.ndarray
        Gradient of ``value`` w.r.t. ``a`` (up to an additive constant), for
        every sample point, including points of weight 0 (c-transform).
    g : numpy.ndarray
        The target's potential.
    method : str
        "exact" or "sinkhorn".
    reg : float
        The absolute entropic regularization eps (0 for exact).
    n_iter : int
        Sinkhorn iterations of the cross term (0 for exact).
    """

    value: float
    f: np.ndarray
    g: np.ndarray
    method: str
    reg: float = 0.0
    n_iter: int = 0


def cost_matrix(X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor,
                dtype: torch.dtype = torch.float64, out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean costs M_jk = ||x_j||^2 + ||y_k||^2 - 2 x_j.y_k, clipped at 0.

    ``out`` (an (n, m) tensor of ``dtype``) is reused instead of allocating:
    at 10k points a fresh 400 MB buffer costs more in page faults than the
    product itself.
    """
    X = torch.as_tensor(X, dtype=dtype)
    Y = torch.as_tensor(Y, dtype=dtype)
    if out is not None and (out.shape != (len(X), len(Y)) or out.dtype != dtype):
        out = None
    # One (n, m) buffer: addmm writes into it, the row norms are added in place.
    M = torch.addmm((Y * Y).sum(1)[None, :], X, Y.T, alpha=-2.0, out=out)
    M.add_((X * X).sum(1)[:, None]).clamp_(min=0.0)
    return M


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def _check_weights(w: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if w is None:
        return _uniform(n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{name} must be {n} non-negative weights, not all zero")
    return w / w.sum()


def exact_ot(X: np.ndarray, Y: np.ndarray, a: np.ndarray | None = None,
             b: np.ndarray | None = None, M: torch.Tensor | np.ndarray | None = None) -> OTResult:
    """Exact OT = min_P <P, M> by POT's network simplex (``ot.emd``) with duals.

    ``f`` is the c-transform f_j = min_k (M_jk - g_k) of the target potential,
    which equals POT's dual on the support of ``a`` and extends it to points of
    weight 0 (needed for the gradient at the simplex boundary).
    """
    if M is None:
        M = cost_matrix(X, Y)
    Mn = M.numpy() if isinstance(M, torch.Tensor) else np.asarray(M)
    Mn = np.ascontiguousarray(Mn, dtype=np.float64)
    a = _check_weights(a, Mn.shape[0], "a")
    b = _check_weights(b, Mn.shape[1], "b")
    _, log = ot.emd(a, b, Mn, numItermax=max(100_000, 50 * Mn.size), log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"ot.emd did not converge: {log['warning']}")
    g = np.asarray(log["v"], dtype=np.float64)
    f = (Mn - g[None, :]).min(axis=1)
    return OTResult(float(log["cost"]), f, g, "exact")


def _column_min(M: torch.Tensor, block: int = 512) -> torch.Tensor:
    """min over rows, by blocks of rows: a strided ``M.amin(0)`` is 40x slower."""
    c = M[0].clone()
    for i in range(0, M.shape[0], block):
        torch.minimum(c, M[i:i + block].amin(dim=0), out=c)
    return c


class _Kernel:
    """exp(-(M - r - c) / eps) in one buffer, with row/column minima r, c taken
    out so every row and column keeps an entry equal to 1 (no underflow)."""

    def __init__(self, M: torch.Tensor, eps: float, symmetric: bool = False) -> None:
        self.eps = eps
        if symmetric:
            # M(x, x) has a zero diagonal: nothing to take out.
            self.r = torch.zeros(M.shape[0], dtype=M.dtype)
            self.c = self.r
        else:
            self.r = M.amin(dim=1)
            M.sub_(self.r[:, None])
            self.c = _column_min(M)
            M.sub_(self.c[None, :])
        self.K = M.div_(-eps).exp_()  # in place: M is consumed

    def solve(self, a: torch.Tensor, b: torch.Tensor, tol: float, max_iter: int,
              symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """Sinkhorn scalings; returns potentials f, g, the dual value and iterations.

        f_j = -eps log (K v)_j + r_j and g_k = -eps log (K^T u)_k + c_k, so
        P = diag(u) K diag(v) = a_j b_k exp((f_j + g_k - M_jk) / eps).
        """
        K, eps = self.K, self.eps
        tiny = torch.finfo(K.dtype).tiny
        if symmetric:
            # Symmetric fixed point u <- sqrt(u a / K u) (Feydy et al. 2019):
            # converges in a few iterations from u = a.
            u = a.clone()
            it = 0
            for it in range(1, max_iter + 1):  # noqa: B007 (it is reported)
                Ku = K.mv(u).clamp_(min=tiny)
                if float((u * Ku - a).abs().sum()) < tol:
                    break
                u = torch.sqrt(u * a / Ku)
            f = -eps * torch.log(K.mv(u).clamp_(min=tiny)) + self.r
            return f, f, float(2 * (a * f).sum()), it
        for omega in (OVERRELAX, 1.0):
            u, v, it, ok = self._scalings(a, b, tol, max_iter, omega)
            if ok:
                break
        f = -eps * torch.log(K.mv(v).clamp_(min=tiny)) + self.r
        g = -eps * torch.log(K.t().mv(u).clamp_(min=tiny)) + self.c
        return f, g, float((a * f).sum() + (b * g).sum()), it

    def _scalings(self, a: torch.Tensor, b: torch.Tensor, tol: float, max_iter: int,
                  omega: float) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """Over-relaxed Sinkhorn (Thibault et al. 2017, "Overrelaxed Sinkhorn-Knopp"):
        u <- u^(1-w) (a / K v)^w, v <- v^(1-w) (b / K^T u)^w; w = 1 is plain Sinkhorn.
        Same fixed point; w = 1.5 took 17 instead of 40 iterations at 5k points.
        Returns ok=False (caller falls back to w = 1) when it did not converge."""
        K, tiny = self.K, torch.finfo(self.K.dtype).tiny
        v = torch.ones_like(b)
        u = torch.ones_like(a)
        for it in range(1, max_iter + 1):
            Kv = K.mv(v).clamp_(min=tiny)
            # Row-marginal error of the current plan, free from this product.
            if it > 1:
                err = float((u * Kv - a).abs().sum())
                if err < tol:
                    return u, v, it, True
                if not math.isfinite(err):
                    return u, v, it, False
            # Points of weight 0 keep scaling 0 (0^(1-w) would be inf).
            u = a / Kv if omega == 1.0 else torch.where(
                a > 0, u.pow(1 - omega) * (a / Kv).pow(omega), 0.0)
            Ktu = K.t().mv(u).clamp_(min=tiny)
            v = b / Ktu if omega == 1.0 else torch.where(
                b > 0, v.pow(1 - omega) * (b / Ktu).pow(omega), 0.0)
        return u, v, max_iter, omega == 1.0


def _dtype_for(n: int, m: int) -> torch.dtype:
    # float64 while small (tests, pilots); float32 halves memory traffic beyond.
    return torch.float64 if n * m <= 4_000_000 else torch.float32


def sinkhorn_divergence(X: np.ndarray, Y: np.ndarray, a: np.ndarray | None = None,
                        b: np.ndarray | None = None, reg: float = 0.02, tol: float = 1e-4,
                        max_iter: int = 1000) -> OTResult:
    """Debiased Sinkhorn divergence S_eps(a, b) = OT_eps(a,b) - OT_eps(a,a)/2 - OT_eps(b,b)/2.

    ``reg`` is relative: eps = reg * mean(M_ab). ``tol`` bounds the L1 error
    of the plan's row marginal. The gradient w.r.t. ``a`` is f_ab - f_aa
    (returned as ``f``). The Sinkhorn loop runs in torch with the kernel kept
    in one buffer: POT's ``ot.sinkhorn`` builds K and the plan afresh per call,
    about 3x slower at 10k points; ``tests/test_ot_mixture.py`` checks this
    loop's plan against ``ot.sinkhorn``.
    """
    X = np.asarray(X)
    Y = np.asarray(Y)
    n, m = X.shape[0], Y.shape[0]
    dtype = _dtype_for(max(n, m), max(n, m))
    at = torch.as_tensor(_check_weights(a, n, "a"), dtype=dtype)
    bt = torch.as_tensor(_check_weights(b, m, "b"), dtype=dtype)
    M = cost_matrix(X, Y, dtype)
    eps = reg * float(M.mean())
    f_ab, g_ab, ot_ab, it = _Kernel(M, eps).solve(at, bt, tol, max_iter)
    # The three problems share one buffer when their shapes agree (n == m).
    M = cost_matrix(X, X, dtype, out=M)
    f_aa, _, ot_aa, _ = _Kernel(M, eps, True).solve(at, at, tol, max_iter, True)
    M = cost_matrix(Y, Y, dtype, out=M)
    _, _, ot_bb, _ = _Kernel(M, eps, True).solve(bt, bt, tol, max_iter, True)
    return OTResult(ot_ab - 0.5 * ot_aa - 0.5 * ot_bb, (f_ab - f_aa).double().numpy(),
                    g_ab.double().numpy(), "sinkhorn", eps, it)


def sinkhorn_divergence_costs(M_ab: np.ndarray | torch.Tensor, M_aa: np.ndarray | torch.Tensor,
                              M_bb: np.ndarray | torch.Tensor, a: np.ndarray | None = None,
                              b: np.ndarray | None = None, reg: float = 0.02, tol: float = 1e-4,
                              max_iter: int = 1000) -> OTResult:
    """``sinkhorn_divergence`` from given cost matrices (any ground cost, e.g. OTDD's).

    ``M_aa`` and ``M_bb`` must be symmetric with a zero diagonal (a cost of a
    point to itself of 0), as the symmetric solver assumes.
    """
    n, m = M_ab.shape
    dtype = _dtype_for(max(n, m), max(n, m))
    at = torch.as_tensor(_check_weights(a, n, "a"), dtype=dtype)
    bt = torch.as_tensor(_check_weights(b, m, "b"), dtype=dtype)
    M = torch.as_tensor(M_ab, dtype=dtype).clone()
    eps = reg * float(M.mean())
    f_ab, g_ab, ot_ab, it = _Kernel(M, eps).solve(at, bt, tol, max_iter)
    M = torch.as_tensor(M_aa, dtype=dtype).clone()
    f_aa, _, ot_aa, _ = _Kernel(M, eps, True).solve(at, at, tol, max_iter, True)
    M = torch.as_tensor(M_bb, dtype=dtype).clone()
    _, _, ot_bb, _ = _Kernel(M, eps, True).solve(bt, bt, tol, max_iter, True)
    return OTResult(ot_ab - 0.5 * ot_aa - 0.5 * ot_bb, (f_ab - f_aa).double().numpy(),
                    g_ab.double().numpy(), "sinkhorn", eps, it)


def ot_distance(X: np.ndarray, Y: np.ndarray, a: np.ndarray | None = None,
                b: np.ndarray | None = None, method: str = "auto", reg: float = 0.02,
                exact_max: int = EXACT_MAX) -> OTResult:
    """OT between weighted point clouds: exact up to ``exact_max`` points a side, else
    the debiased Sinkhorn divergence (see module doc).

    Example
    -------
    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0]]); Y = np.array([[0.0], [3.0]])
    >>> round(ot_distance(X, Y).value, 6)  # (0 + 4) / 2
    2.0
    """
    if method not in ("auto", "exact", "sinkhorn"):
        raise ValueError(f"method must be auto, exact or sinkhorn; got {method!r}")
    if method == "auto":
        method = "exact" if max(len(X), len(Y)) <= exact_max else "sinkhorn"
    if method == "exact":
        return exact_ot(X, Y, a, b)
    return sinkhorn_divergence(X, Y, a, b, reg=reg)


# label-aware dataset distance (OTDD) -----------------------------------------

def class_wasserstein(X1: np.ndarray, y1: np.ndarray, X2: np.ndarray,
                      y2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W_2^2 between every class-conditional of (X1, y1) and every one of (X2, y2).

    The label cost of OTDD (Alvarez-Melis and Fusi 2020, "Geometric Dataset
    Distances via Optimal Transport", Eq. 3-4) with the *exact* inner OT
    between the empirical class-conditionals (uniform weights within a class,
    squared Euclidean ground cost, POT's ``ot.emd2``). The paper also offers a
    Gaussian approximation (Bures-Wasserstein between class means and
    covariances; the default of github.com/microsoft/otdd); we use the exact
    form, which needs no covariance estimate for classes of a few points.

    Cost: one network-simplex solve per pair of classes, sum over pairs of
    O((n_c + m_c')^3) in the worst case for classes of n_c and m_c' points
    (a few ms per pair at 50 x 50 points); memory n_c x m_c' per pair.

    Returns
    -------
    (classes1, classes2, W)
        The sorted labels present in each set and W[i, k] = W_2^2(alpha_i, beta_k).
    """
    X1, X2 = np.asarray(X1, dtype=np.float64), np.asarray(X2, dtype=np.float64)
    y1, y2 = np.asarray(y1), np.asarray(y2)
    if len(y1) != len(X1) or len(y2) != len(X2):
        raise ValueError("labels must have one entry per point")
    c1, c2 = np.unique(y1), np.unique(y2)
    members1 = [X1[y1 == c] for c in c1]
    members2 = [X2[y2 == c] for c in c2]
    W = np.zeros((len(c1), len(c2)))
    for i, A in enumerate(members1):
        for k, B in enumerate(members2):
            if A is B or (A.shape == B.shape and np.array_equal(A, B)):
                continue  # the same empirical measure: W = 0
            W[i, k] = ot.emd2([], [], cost_matrix(A, B).numpy(), numItermax=1_000_000)
    return c1, c2, W


def otdd_cost_matrix(X: np.ndarray, y: np.ndarray, Y: np.ndarray, z: np.ndarray,
                     label_cost: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """OTDD ground cost between labelled points (Alvarez-Melis and Fusi 2020, Eq. 4, p = 2):

        d((x, y), (x', y'))^2 = ||x - x'||^2 + W_2^2(alpha_y, beta_y') ,

    with alpha_y the class-conditional of label y in (X, y) and beta_y' that
    of y' in (Y, z) (``class_wasserstein``; pass ``label_cost`` to reuse it).
    """
    c1, c2, W = label_cost if label_cost is not None else class_wasserstein(X, y, Y, z)
    i = np.searchsorted(c1, np.asarray(y))
    k = np.searchsorted(c2, np.asarray(z))
    return cost_matrix(X, Y).numpy() + W[i][:, k]


def dataset_distance(X: np.ndarray, Y: np.ndarray, labels: np.ndarray | None = None,
                     target_labels: np.ndarray | None = None, a: np.ndarray | None = None,
                     b: np.ndarray | None = None, cost: str = "euclidean", method: str = "auto",
                     reg: float = 0.02, exact_max: int = EXACT_MAX) -> OTResult:
    """OT between two datasets, label-free or label-aware.

    ``cost="euclidean"`` is the label-free OT of ``ot_distance`` (squared
    Euclidean ground cost between embeddings; labels ignored).
    ``cost="otdd"`` is the OTDD of Alvarez-Melis and Fusi (2020), the
    distance the Projektor paper uses: the ground cost adds the W_2^2 between
    the class-conditionals of the two points' labels (``otdd_cost_matrix``),
    so two sets with the same features but labels arranged differently are
    apart. Exact up to ``exact_max`` points a side (``ot.emd``), else the
    debiased Sinkhorn divergence with the same ground cost (its self terms use
    the label costs within each set).

    Example
    -------
    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0]]); y = np.array([0, 1])
    >>> round(dataset_distance(X, X, y, y, cost="otdd").value, 6)
    0.0
    >>> z = np.array([0, 0])  # same features, one label for both points
    >>> round(dataset_distance(X, X, y, z).value, 6), round(dataset_distance(X, X, y, z, cost="otdd").value, 6)
    (0.0, 0.5)
    """
    if cost not in ("euclidean", "otdd"):
        raise ValueError(f"cost must be euclidean (label-free) or otdd; got {cost!r}")
    if method not in ("auto", "exact", "sinkhorn"):
        raise ValueError(f"method must be auto, exact or sinkhorn; got {method!r}")
    if cost == "euclidean":
        return ot_distance(X, Y, a, b, method=method, reg=reg, exact_max=exact_max)
    if labels is None or target_labels is None:
        raise ValueError("cost='otdd' needs labels and target_labels")
    if method == "auto":
        method = "exact" if max(len(X), len(Y)) <= exact_max else "sinkhorn"
    M = otdd_cost_matrix(X, labels, Y, target_labels)
    if method == "exact":
        return exact_ot(X, Y, a, b, M)
    M_aa = otdd_cost_matrix(X, labels, X, labels)
    M_bb = otdd_cost_matrix(Y, target_labels, Y, target_labels)
    np.fill_diagonal(M_aa, 0.0)
    np.fill_diagonal(M_bb, 0.0)
    return sinkhorn_divergence_costs(M, M_aa, M_bb, a, b, reg=reg)


# mixtures of sources ------------------------------------------------------

def mixture_point_weights(sources: np.ndarray, p: Sequence[float] | np.ndarray) -> np.ndarray:
    """a_j = p_s / n_s for point j of source s (the pools realize mixture p)."""
    sources = np.asarray(sources, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    counts = np.bincount(sources, minlength=p.size).astype(np.float64)
    if np.any((counts == 0) & (p > 0)):
        raise ValueError("a source with ratio > 0 has no points in the pool")
    per = np.divide(p, counts, out=np.zeros_like(p), where=counts > 0)
    return per[sources]


def mixture_gradient(f: np.ndarray, sources: np.ndarray, num_sources: int) -> np.ndarray:
    """d OT / d p_i = (1/n_i) sum_{j in source i} f_j (reweighting form)."""
    sources = np.asarray(sources, dtype=np.int64)
    counts = np.bincount(sources, minlength=num_sources).astype(np.float64)
    sums = np.bincount(sources, weights=f, minlength=num_sources)
    return np.divide(sums, counts, out=np.zeros(num_sources), where=counts > 0)


def calibrated_gradient(f: np.ndarray, sources: np.ndarray, num_sources: int) -> np.ndarray:
    """The paper's calibrated gradient for a sample of N points, n_i from source i:

    (1/n_i) (sum_{j in i} f_j - n_i / (N - n_i) sum_{j not in i} f_j).
    """
    sources = np.asarray(sources, dtype=np.int64)
    counts = np.bincount(sources, minlength=num_sources).astype(np.float64)
    sums = np.bincount(sources, weights=f, minlength=num_sources)
    total, N = f.sum(), counts.sum()
    rest = np.divide(counts, N - counts, out=np.zeros(num_sources), where=N - counts > 0)
    out = sums - rest * (total - sums)
    return np.divide(out, counts, out=np.zeros(num_sources), where=counts > 0)


class MixtureOT:
    """OT(p) and dOT/dp between a mixture of source pools and a target set.

    Costs (exact) or kernels (Sinkhorn) are computed once and reused for every
    mixture p; the target's self term is constant and computed once.

    Parameters
    ----------
    pools : list of arrays (n_i, d)
        Embeddings of the points of each source.
    target : array (m, d)
        Embeddings of the target data.
    method : {"auto", "exact", "sinkhorn"}
    reg : float
        Relative entropic regularization for Sinkhorn (eps = reg * mean cost).
    """

    def __init__(self, pools: Sequence[np.ndarray], target: np.ndarray, method: str = "auto",
                 reg: float = 0.02, tol: float = 1e-4, exact_max: int = EXACT_MAX) -> None:
        if len(pools) < 2:
            raise ValueError("pools must hold at least 2 sources")
        self.num_sources = len(pools)
        self.X = np.concatenate([np.asarray(x, dtype=np.float64) for x in pools])
        self.sources = np.concatenate([np.full(len(x), i) for i, x in enumerate(pools)])
        self.Y = np.asarray(target, dtype=np.float64)
        n, m = len(self.X), len(self.Y)
        if method == "auto":
            method = "exact" if max(n, m) <= exact_max else "sinkhorn"
        if method not in ("exact", "sinkhorn"):
            raise ValueError(f"method must be auto, exact or sinkhorn; got {method!r}")
        self.method, self.tol = method, tol
        self.b = _uniform(m)
        if method == "exact":
            self._M = cost_matrix(self.X, self.Y).numpy()
        else:
            dtype = _dtype_for(max(n, m), max(n, m))
            M = cost_matrix(self.X, self.Y, dtype)
            self.eps = reg * float(M.mean())
            self._dtype = dtype
            self._kab = _Kernel(M, self.eps)
            self._kaa = _Kernel(cost_matrix(self.X, self.X, dtype), self.eps, True)
            bt = torch.as_tensor(self.b, dtype=dtype)
            kbb = _Kernel(cost_matrix(self.Y, self.Y, dtype), self.eps, True)
            self._ot_bb = kbb.solve(bt, bt, tol, 1000, True)[2]

    def distance(self, p: Sequence[float] | np.ndarray) -> tuple[float, np.ndarray]:
        """OT(p) and its gradient d OT / d p (one entry per source)."""
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (self.num_sources,):
            raise ValueError(f"p must have {self.num_sources} entries, got {p.shape}")
        a = mixture_point_weights(self.sources, p)
        if self.method == "exact":
            r = exact_ot(self.X, self.Y, a, self.b, self._M)
            return r.value, mixture_gradient(r.f, self.sources, self.num_sources)
        at = torch.as_tensor(a, dtype=self._dtype)
        bt = torch.as_tensor(self.b, dtype=self._dtype)
        f_ab, _, ot_ab, _ = self._kab.solve(at, bt, self.tol, 1000)
        f_aa, _, ot_aa, _ = self._kaa.solve(at, at, self.tol, 1000, True)
        value = ot_ab - 0.5 * ot_aa - 0.5 * self._ot_bb
        return value, mixture_gradient((f_ab - f_aa).double().numpy(), self.sources,
                                       self.num_sources)


def sample_counts(p: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """n_i of a sample D(n, p): floor(n p_i), the remainder to the largest fractional parts."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"p must be a probability vector, got {p}")
    raw = p * n
    counts = np.floor(raw).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


class SampledMixtureOT:
    """OT between a sample D(N, p) of the sources and the target, on the sample itself.

    As in the Projektor paper (and its code), every mixture p at data size N
    gets its own training sample of N points, n_i = N p_i from source i, and
    OT is computed between that sample (uniform weights 1/N) and the target,
    so the OT feature depends on N and the predictors at N0 and N1 see
    different values. Its gradient w.r.t. p comes from the dual potential f
    of that problem: raising p_i scales up the weights a_j = p_i / n_i of
    source i's points in the sample, so

        d OT / d p_i = (1 / n_i) sum_{j in sample, source i} f_j

    (``mixture_gradient``; the paper's calibrated form is
    ``calibrated_gradient`` of the same f). A source with n_i = 0 gets the
    mean of the c-transform over the next ``probe`` points of its stream,
    the derivative of adding mass there.

    Samples are nested: source i contributes the first n_i points of its
    ``stream`` (an i.i.d. draw the caller makes), so nearby mixtures share
    most points and OT(p) moves by single points as p moves (common random
    numbers); an independent draw is a new set of streams.

    With ``cost="otdd"`` the ground cost is OTDD's (``otdd_cost_matrix``),
    computed with the sample's own class-conditionals; the gradient holds
    the label costs fixed (a first-order term from the class-conditionals'
    own dependence on p is left out).

    Parameters
    ----------
    streams : list of arrays (L_i, d)
        Points of source i in draw order; L_i >= the largest n_i asked for.
    target : array (m, d)
    stream_labels, target_labels : arrays, optional
        Class labels, needed for ``cost="otdd"``.
    cost : {"euclidean", "otdd"}
        "euclidean" is label-free OT (squared Euclidean ground cost).
    method : {"auto", "exact", "sinkhorn"}
        auto: exact (``ot.emd``) up to ``exact_max`` points a side, else the
        debiased Sinkhorn divergence with relative regularization ``reg``.
    probe : int
        Points of a source absent from the sample used for its gradient.
    tol : float
        Sinkhorn's marginal tolerance.
    """

    def __init__(self, streams: Sequence[np.ndarray], target: np.ndarray,
                 stream_labels: Sequence[np.ndarray] | None = None,
                 target_labels: np.ndarray | None = None, cost: str = "euclidean",
                 method: str = "auto", reg: float = 0.02, exact_max: int = EXACT_MAX,
                 probe: int = 16, tol: float = 1e-4) -> None:
        if len(streams) < 2:
            raise ValueError("streams must hold at least 2 sources")
        if cost not in ("euclidean", "otdd"):
            raise ValueError(f"cost must be euclidean (label-free) or otdd; got {cost!r}")
        if method not in ("auto", "exact", "sinkhorn"):
            raise ValueError(f"method must be auto, exact or sinkhorn; got {method!r}")
        if cost == "otdd" and (stream_labels is None or target_labels is None):
            raise ValueError("cost='otdd' needs stream_labels and target_labels")
        self.streams = [np.asarray(x, dtype=np.float64) for x in streams]
        self.labels = None if stream_labels is None else [np.asarray(y) for y in stream_labels]
        self.Y = np.asarray(target, dtype=np.float64)
        self.z = None if target_labels is None else np.asarray(target_labels)
        self.num_sources = len(streams)
        self.cost, self.method, self.reg, self.exact_max, self.probe = cost, method, reg, exact_max, probe
        self.tol = tol

    def sample(self, p: Sequence[float] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Points, source of each point and labels (or None) of D(n, p)."""
        counts = sample_counts(p, n)
        for i, c in enumerate(counts):
            if c > len(self.streams[i]):
                raise ValueError(f"source {i} needs {c} points, its stream has {len(self.streams[i])}")
        X = np.concatenate([s[:c] for s, c in zip(self.streams, counts, strict=True)])
        src = np.repeat(np.arange(self.num_sources), counts)
        lab = None if self.labels is None else np.concatenate(
            [y[:c] for y, c in zip(self.labels, counts, strict=True)])
        return X, src, lab

    def distance(self, p: Sequence[float] | np.ndarray, n: int) -> tuple[float, np.ndarray]:
        """OT(D(n, p), target) and d OT / d p (one entry per source)."""
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (self.num_sources,):
            raise ValueError(f"p must have {self.num_sources} entries, got {p.shape}")
        X, src, lab = self.sample(p, n)
        method = self.method
        if method == "auto":
            method = "exact" if max(len(X), len(self.Y)) <= self.exact_max else "sinkhorn"
        label_cost = None
        if self.cost == "otdd":
            label_cost = class_wasserstein(X, lab, self.Y, self.z)
            M = otdd_cost_matrix(X, lab, self.Y, self.z, label_cost)
        else:
            M = cost_matrix(X, self.Y).numpy()
        if method == "exact":
            r = exact_ot(X, self.Y, None, None, M)
        elif self.cost == "otdd":
            M_aa = otdd_cost_matrix(X, lab, X, lab)
            M_bb = otdd_cost_matrix(self.Y, self.z, self.Y, self.z)
            np.fill_diagonal(M_aa, 0.0)
            np.fill_diagonal(M_bb, 0.0)
            r = sinkhorn_divergence_costs(M, M_aa, M_bb, reg=self.reg, tol=self.tol,
                                          max_iter=100_000)
        else:
            r = sinkhorn_divergence(X, self.Y, reg=self.reg, tol=self.tol, max_iter=100_000)
        grad = mixture_gradient(r.f, src, self.num_sources)
        counts = np.bincount(src, minlength=self.num_sources)
        for i in np.flatnonzero(counts == 0):
            grad[i] = self._probe_gradient(i, r, label_cost, method)
        return r.value, grad

    def _probe_gradient(self, i: int, r: OTResult, label_cost, method: str) -> float:
        """Mean c-transform f_j = min_k (M_jk - g_k) over the first points of an absent source.

        Exact OT: the derivative of adding mass at those points. Sinkhorn: the
        hard c-transform of g_ab, the eps -> 0 limit of the cross term, without
        the self term's -f_aa (an approximation, used only at the boundary).
        Label costs of classes the sample lacks come from the probe points'
        own class-conditionals.
        """
        P = self.streams[i][:self.probe]
        if len(P) == 0:
            return 0.0
        M = cost_matrix(P, self.Y).numpy()
        if self.cost == "otdd":
            c1, c2, W = label_cost
            lab = self.labels[i][:self.probe]
            cp, _, Wp = class_wasserstein(P, lab, self.Y, self.z)
            extra = Wp[np.searchsorted(cp, lab)]
            known = np.isin(lab, c1)
            if np.any(known):
                extra[known] = W[np.searchsorted(c1, lab[known])]
            M = M + extra[:, np.searchsorted(c2, self.z)]
        return float((M - r.g[None, :]).min(axis=1).mean())


# the performance predictor ------------------------------------------------

def _features(P: np.ndarray, ot_values: np.ndarray) -> np.ndarray:
    """Columns [OT, p_i OT, p_i^2 OT, p_i, p_i^2] over the m - 1 free ratios."""
    z = P[:, :-1]
    o = ot_values[:, None]
    return np.hstack([o, z * o, z * z * o, z, z * z])


@dataclass
class ProjektorPredictor:
    """L(p) = (b_0 + sum_{i<m} b2_i p_i^2 + b1_i p_i) OT(p) + c_0 + sum_{i<m} c2_i p_i^2 + c1_i p_i.

    Fitted by least squares at one data size (module doc). Attributes hold
    the coefficients; ``b1``, ``b2``, ``c1``, ``c2`` have m - 1 entries.
    """

    b0: float = 0.0
    b1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    b2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    c0: float = 0.0
    c1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    c2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def fit(cls, P: np.ndarray, ot_values: np.ndarray, performance: np.ndarray,
            ridge: float = 0.0) -> ProjektorPredictor:
        """Least squares (optionally ridge on all but the intercept) on pilot runs.

        ``P`` (runs, m) mixtures, ``ot_values`` (runs,) OT of each, ``performance``
        (runs,) the measured loss or accuracy.
        """
        P = np.asarray(P, dtype=np.float64)
        o = np.asarray(ot_values, dtype=np.float64)
        y = np.asarray(performance, dtype=np.float64)
        if P.ndim != 2 or P.shape[1] < 2 or len(o) != len(P) or len(y) != len(P):
            raise ValueError("P must be (runs, m>=2) and ot_values, performance (runs,)")
        k = P.shape[1] - 1
        X = _features(P, o)
        if len(P) < X.shape[1] + 1:
            raise ValueError(f"need at least {X.shape[1] + 1} pilot runs for {P.shape[1]} sources, "
                             f"got {len(P)}")
        A = np.hstack([X, np.ones((len(P), 1))])
        if ridge > 0:
            reg = np.sqrt(ridge) * np.eye(A.shape[1])[:-1]
            coef = np.linalg.lstsq(np.vstack([A, reg]), np.concatenate([y, np.zeros(len(reg))]),
                                   rcond=None)[0]
        else:
            coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return cls(b0=float(coef[0]), b1=coef[1:1 + k], b2=coef[1 + k:1 + 2 * k],
                   c1=coef[1 + 2 * k:1 + 3 * k], c2=coef[1 + 3 * k:1 + 4 * k], c0=float(coef[-1]))

    def predict(self, P: np.ndarray, ot_values: np.ndarray | float) -> np.ndarray:
        P = np.atleast_2d(np.asarray(P, dtype=np.float64))
        o = np.broadcast_to(np.asarray(ot_values, dtype=np.float64), (len(P),))
        z = P[:, :-1]
        coef_ot = self.b0 + z @ self.b1 + (z * z) @ self.b2
        return coef_ot * o + self.c0 + z @ self.c1 + (z * z) @ self.c2

    def gradient(self, p: np.ndarray, ot_value: float, ot_grad: np.ndarray) -> np.ndarray:
        """dL/dp as a full-length vector whose last entry is 0 (p_m = 1 - sum of the rest).

        dL/dz_i = (2 b2_i p_i + b1_i) OT + A(p) (dOT/dp_i - dOT/dp_m) + 2 c2_i p_i + c1_i,
        A(p) = b_0 + sum_i b2_i p_i^2 + b1_i p_i. Any vector differing by a
        multiple of (1, ..., 1) gives the same projected step.
        """
        p = np.asarray(p, dtype=np.float64)
        z = p[:-1]
        A = self.b0 + z @ self.b1 + (z * z) @ self.b2
        dz = ((2 * self.b2 * z + self.b1) * ot_value + A * (ot_grad[:-1] - ot_grad[-1])
              + 2 * self.c2 * z + self.c1)
        return np.append(dz, 0.0)


def extrapolate(y0: np.ndarray | float, y1: np.ndarray | float, n0: float, n1: float,
                n: float) -> np.ndarray:
    """The paper's projection: [log(N/N0) y(N1) - log(N/N1) y(N0)] / log(N1/N0)."""
    if not 0 < n0 < n1:
        raise ValueError(f"need 0 < n0 < n1, got n0={n0}, n1={n1}")
    return (math.log(n / n0) * np.asarray(y1) - math.log(n / n1) * np.asarray(y0)) / math.log(n1 / n0)


@dataclass
class ScalingPredictor:
    """Predictors fitted at pilot sizes n0 < n1, projected to size n in log N."""

    at_n0: ProjektorPredictor
    at_n1: ProjektorPredictor
    n0: float
    n1: float

    def predict(self, P: np.ndarray, ot_n0: np.ndarray | float, ot_n1: np.ndarray | float,
                n: float) -> np.ndarray:
        return extrapolate(self.at_n0.predict(P, ot_n0), self.at_n1.predict(P, ot_n1),
                           self.n0, self.n1, n)

    def gradient(self, p: np.ndarray, ot_value: float, ot_grad: np.ndarray, n: float,
                 ot_n1: tuple[float, np.ndarray] | None = None) -> np.ndarray:
        """Gradient of the projection; OT at n1 defaults to the one at n0 (same pools)."""
        o1, g1 = ot_n1 if ot_n1 is not None else (ot_value, ot_grad)
        return extrapolate(self.at_n0.gradient(p, ot_value, ot_grad),
                           self.at_n1.gradient(p, o1, g1), self.n0, self.n1, n)


# optimization on the simplex ---------------------------------------------

def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {p >= 0, sum p = 1} (POT's ``ot.utils.proj_simplex``)."""
    return np.asarray(ot.utils.proj_simplex(np.asarray(v, dtype=np.float64)), dtype=np.float64)


@dataclass
class OptimizeResult:
    p: np.ndarray
    value: float
    history: list[tuple[np.ndarray, float]]


def optimize_mixture(objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
                     p0: Sequence[float] | np.ndarray, steps: int = 30, lr: float = 0.1,
                     maximize: bool = False, min_lr: float = 1e-4,
                     progress: bool = False) -> OptimizeResult:
    """Projected gradient on the simplex with backtracking.

    Each step tries p' = proj(p -/+ lr * g / ||g||_inf) and halves ``lr`` until
    the objective improves (so it never gets worse); stops when ``lr`` falls
    below ``min_lr``. ``objective(p)`` returns (value, gradient).
    """
    p = project_simplex(np.asarray(p0, dtype=np.float64))
    sign = -1.0 if maximize else 1.0
    value, grad = objective(p)
    history = [(p.copy(), value)]
    for _ in tqdm(range(steps), desc="optimize mixture", disable=not progress):
        # Centering removes the component normal to the simplex.
        g = grad - grad.mean()
        scale = np.abs(g).max()
        if scale == 0:
            break
        while lr >= min_lr:
            q = project_simplex(p - sign * lr * g / scale)
            v, gq = objective(q)
            if sign * v < sign * value:
                p, value, grad = q, v, gq
                history.append((p.copy(), value))
                break
            lr *= 0.5
        else:
            break
    return OptimizeResult(p, value, history)
