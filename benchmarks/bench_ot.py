"""OT at 1k, 5k and 10k points: exact (POT network simplex) vs debiased Sinkhorn.

For each size n (n points a side, 64-d unit vectors drawn from two shifted
Gaussian mixtures, like sentence embeddings of two corpora) it times, on one
thread:

- exact OT, ``ot.emd`` (sizes up to ``--exact-max``),
- our debiased Sinkhorn divergence (``gristmill.selectors.ot_mixture``),
- the same divergence with POT's ``ot.sinkhorn`` for the three terms (baseline),

and reports Sinkhorn's relative error against exact OT and the time ratio
POT-Sinkhorn / ours. Goal: 10k points in <= 3 s on one core.

What the mixture optimizer needs from the divergence is the order of
mixtures, so a second table ranks 21 mixtures of three sources (2,000 pool
points, 1,000 target points) by exact OT and by Sinkhorn and reports the
Spearman correlation and the agreement of the two gradients' directions.

A third table gives the cost of the label-aware OTDD against label-free OT
(exact, 10 classes, 64-d): the class-to-class label costs alone and the
whole distance (``--only-otdd`` runs just that table).

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_ot.py [--sizes 1000 5000 10000]``
"""

from __future__ import annotations

import argparse
import os
import time

# One BLAS thread, so POT's numpy baseline runs on one core like ours.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import ot  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from gristmill.selectors.ot_mixture import (  # noqa: E402
    MixtureOT,
    class_wasserstein,
    cost_matrix,
    dataset_distance,
    exact_ot,
    sinkhorn_divergence,
)


def clouds(n: int, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, d))
    def draw(shift: float, weights: np.ndarray) -> np.ndarray:
        k = rng.choice(8, size=n, p=weights)
        x = centers[k] + shift + 0.7 * rng.normal(size=(n, d))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    X = draw(0.0, np.full(8, 1 / 8))
    Y = draw(0.05, rng.dirichlet(np.ones(8)))
    return X.astype(np.float32), Y.astype(np.float32)


def pot_sinkhorn_divergence(X: np.ndarray, Y: np.ndarray, reg: float, tol: float) -> float:
    """Baseline: the same debiased divergence with POT's ``ot.sinkhorn`` (float32 numpy)."""
    n, m = len(X), len(Y)
    a = np.full(n, 1 / n, np.float32)
    b = np.full(m, 1 / m, np.float32)
    M = cost_matrix(X, Y, torch.float32).numpy()
    eps = reg * float(M.mean())

    def ot_eps(p, q, C):
        # Dual value <p, f> + <q, g> from POT's scalings, as in our solver.
        _, log = ot.sinkhorn(p, q, C, eps, stopThr=tol, numItermax=1000, log=True)
        f = eps * np.log(np.maximum(log["u"], 1e-38) / p)
        g = eps * np.log(np.maximum(log["v"], 1e-38) / q)
        return float(p @ f + q @ g)

    ab = ot_eps(a, b, M)
    del M
    aa = ot_eps(a, a, cost_matrix(X, X, torch.float32).numpy())
    bb = ot_eps(b, b, cost_matrix(Y, Y, torch.float32).numpy())
    return ab - 0.5 * aa - 0.5 * bb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--exact-max", type=int, default=5000)
    ap.add_argument("--regs", type=float, nargs="+", default=[0.02, 0.05])
    ap.add_argument("--pot-baseline-max", type=int, default=10000)
    ap.add_argument("--only-otdd", action="store_true", help="only the OTDD cost table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.only_otdd:
        otdd_cost()
        return
    print(f"{'n':>6} {'method':<22} {'value':>10} {'wall_s':>8} {'cpu_s':>8} {'rel_err':>8} {'iters':>6}")
    for n in args.sizes:
        X, Y = clouds(n)
        exact_value = None
        if n <= args.exact_max:
            t, c = time.perf_counter(), time.process_time()
            exact_value = exact_ot(X, Y).value
            te, ce = time.perf_counter() - t, time.process_time() - c
            print(f"{n:>6} {'exact ot.emd':<22} {exact_value:>10.5f} {te:>8.2f} {ce:>8.2f}")
        for reg in args.regs:
            t, c = time.perf_counter(), time.process_time()
            r = sinkhorn_divergence(X, Y, reg=reg)
            ts, cs = time.perf_counter() - t, time.process_time() - c
            err = f"{abs(r.value - exact_value) / exact_value:>8.2%}" if exact_value else f"{'n/a':>8}"
            print(f"{n:>6} {'ours sinkhorn reg=' + str(reg):<22} {r.value:>10.5f} {ts:>8.2f} {cs:>8.2f} {err} "
                  f"{r.n_iter:>6}")
            if n <= args.pot_baseline_max and reg == args.regs[0]:
                t, c = time.perf_counter(), time.process_time()
                v = pot_sinkhorn_divergence(X, Y, reg, 1e-4)
                tp, cp = time.perf_counter() - t, time.process_time() - c
                print(f"{n:>6} {'POT sinkhorn reg=' + str(reg):<22} {v:>10.5f} {tp:>8.2f} {cp:>8.2f}"
                      f" {'':>8} {'':>6}   POT/ours wall {tp / ts:.2f}x, cpu {cp / cs:.2f}x")
    ranking(args.regs)
    otdd_cost()


def otdd_cost(sizes: tuple[tuple[int, int], ...] = ((200, 500), (1000, 1000), (2000, 2000)),
              classes: int = 10) -> None:
    """CPU seconds of label-free OT vs OTDD (exact inner OT between classes), exact outer OT."""
    print(f"\n{'n x m':>11} {'label-free OT s':>16} {'OTDD label costs s':>19} {'OTDD total s':>13}")
    rng = np.random.default_rng(0)
    for n, m in sizes:
        X, Y = clouds(max(n, m))
        X, Y = X[:n], Y[:m]
        y, z = rng.integers(0, classes, n), rng.integers(0, classes, m)
        c = time.process_time()
        dataset_distance(X, Y, y, z, method="exact")
        t_plain = time.process_time() - c
        c = time.process_time()
        class_wasserstein(X, y, Y, z)
        t_label = time.process_time() - c
        c = time.process_time()
        dataset_distance(X, Y, y, z, cost="otdd", method="exact")
        t_otdd = time.process_time() - c
        print(f"{n:>5} x {m:<5} {t_plain:>16.3f} {t_label:>19.3f} {t_otdd:>13.3f}")


def ranking(regs: list[float]) -> None:
    rng = np.random.default_rng(1)
    X, Y = clouds(3000, seed=2)
    # Three sources: the pool split by which third of the mixture components it came from.
    order = np.argsort(X[:, 0])
    pools = [X[order[i::3]][:667] for i in range(3)]
    pools[1] = pools[1] * 0.8 + 0.2 * Y[:667]
    target = Y[1000:2000]
    P = rng.dirichlet(np.ones(3), size=21)
    t = time.perf_counter()
    exact = MixtureOT(pools, target, method="exact")
    ev = [exact.distance(p) for p in P]
    te = (time.perf_counter() - t) / len(P)
    print(f"\nranking 21 mixtures (2,001 pool points, 1,000 target): exact {te:.2f} s per mixture")
    for reg in regs:
        t = time.perf_counter()
        sk = MixtureOT(pools, target, method="sinkhorn", reg=reg)
        sv = [sk.distance(p) for p in P]
        ts = (time.perf_counter() - t) / len(P)
        rho = spearmanr([v for v, _ in ev], [v for v, _ in sv]).statistic
        cos = np.mean([np.dot(ge - ge.mean(), gs - gs.mean())
                       / (np.linalg.norm(ge - ge.mean()) * np.linalg.norm(gs - gs.mean()))
                       for (_, ge), (_, gs) in zip(ev, sv, strict=True)])
        print(f"  sinkhorn reg={reg}: Spearman {rho:.3f}, mean cosine of centered gradients {cos:.3f}, "
              f"{ts:.2f} s per mixture (incl. kernels)")


if __name__ == "__main__":
    main()
