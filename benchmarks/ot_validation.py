"""Validate Projektor-style OT mixture prediction and optimization on two small tasks.

Tasks (both offline):

``digits``  scikit-learn's bundled ``load_digits`` (8x8 images, 10 classes);
            features = pixels / 16.
``text``    docstrings of six Python standard-library packages (tkinter,
            distutils, asyncio, email, _pydecimal, logging), parsed with
            ``ast`` from this interpreter's stdlib and labelled by package;
            features = hashed character n-grams (``HashedNgramEmbedder``), or
            a sentence-embedding model from ``--model PATH``.

Setup (after the paper's CIFAR-10 example): three sources with skewed class
priors (each puts 97% of its mass on a third of the classes), a balanced target
set, a logistic-regression classifier as the "model", accuracy on the target
as the performance. For every mixture p on a 0.1-grid of the simplex (66
mixtures) a training set of N points is drawn (n_i = N p_i from source i) and
the model trained, at pilot sizes N0 and N1 (3 draws each, averaged).

Measured:
1. predictor error on held-out mixtures (random third of the grid, and the
   paper's region split p_2 >= 0.5): MAE and R^2 at N0 and N1;
2. extrapolation: predicted accuracy at N > N1 (parameter-free log-N
   projection of both fitted predictors) vs accuracy actually measured at N;
3. optimization: projected gradient on the simplex of the projected predictor
   (gradient of OT from dual potentials), vs the mixture of least OT to the
   target (no pilots needed), the uniform mixture and the best pilot
   mixture, all measured at N.

OT feature: exact OT between the target and fixed per-source pools reweighted
to p (``MixtureOT``); the paper computes OT on each pilot sample instead. The
pool form is deterministic in p and gives the gradient the optimizer uses.

Run: ``nice -n 10 .venv/bin/python benchmarks/ot_validation.py [--task digits text]``
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
import time
import warnings
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import mean_absolute_error, r2_score  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from gristmill.scorers.embeddings import make_embedder  # noqa: E402
from gristmill.selectors.ot_mixture import (  # noqa: E402
    MixtureOT,
    ProjektorPredictor,
    ScalingPredictor,
    extrapolate,
    optimize_mixture,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_PACKAGES = ["tkinter", "distutils", "asyncio", "email", "_pydecimal", "logging"]


@dataclass
class Task:
    name: str
    X: np.ndarray
    y: np.ndarray
    n0: int
    n1: int
    n_big: int
    per_class_target: int


def digits_task() -> Task:
    d = load_digits()
    return Task("digits", d.data / 16.0, d.target, n0=100, n1=200, n_big=600, per_class_target=50)


def stdlib_docstrings() -> tuple[list[str], np.ndarray]:
    root = sysconfig.get_paths()["stdlib"]
    texts, labels = [], []
    for label, pkg in enumerate(TEXT_PACKAGES):
        base = os.path.join(root, pkg)
        files = [base + ".py"] if os.path.exists(base + ".py") else [
            os.path.join(dp, f) for dp, _, fs in sorted(os.walk(base)) for f in sorted(fs)
            if f.endswith(".py") and "test" not in dp]
        for path in files:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80:
                        texts.append(doc)
                        labels.append(label)
    return texts, np.asarray(labels)


def text_task(model: str | None) -> Task:
    texts, y = stdlib_docstrings()
    emb = make_embedder(model, dim=256)
    X = emb.embed(texts).astype(np.float64)
    name = "text" if model is None else f"text-{os.path.basename(os.path.normpath(model))}"
    return Task(name, X, y, n0=100, n1=200, n_big=500, per_class_target=40)


def source_priors(num_classes: int, num_sources: int = 3, major: float = 0.97) -> np.ndarray:
    groups = np.array_split(np.arange(num_classes), num_sources)
    pri = np.zeros((num_sources, num_classes))
    for s, g in enumerate(groups):
        pri[s] = (1 - major) / (num_classes - len(g))
        pri[s, g] = major / len(g)
    return pri


def simplex_grid(step: float = 0.1) -> np.ndarray:
    k = round(1 / step)
    return np.array([[i / k, j / k, (k - i - j) / k] for i in range(k + 1) for j in range(k + 1 - i)])


class Experiment:
    def __init__(self, task: Task, seed: int = 0, reps: int = 3) -> None:
        self.task, self.reps = task, reps
        rng = np.random.default_rng(seed)
        classes = np.unique(task.y)
        target_idx = np.concatenate([rng.choice(np.flatnonzero(task.y == c), task.per_class_target,
                                                replace=False) for c in classes])
        train_mask = np.ones(len(task.y), bool)
        train_mask[target_idx] = False
        self.Xt, self.yt = task.X[target_idx], task.y[target_idx]
        self.class_pools = [np.flatnonzero(train_mask & (task.y == c)) for c in classes]
        self.priors = source_priors(len(classes))
        # Fixed per-source pools (300 points each) for the OT feature and its gradient.
        pools = [task.X[self._draw_source(s, 300, rng)] for s in range(3)]
        self.mot = MixtureOT(pools, self.Xt, method="exact")

    def _draw_source(self, s: int, n: int, rng: np.random.Generator) -> np.ndarray:
        cls = rng.choice(len(self.class_pools), size=n, p=self.priors[s])
        return np.array([rng.choice(self.class_pools[c]) for c in cls], dtype=np.int64)

    def accuracy(self, p: np.ndarray, n: int, seed: int) -> float:
        """Mean target accuracy of logistic regression over ``reps`` draws of D(n, p)."""
        accs = []
        for r in range(self.reps):
            rng = np.random.default_rng([seed, r, n])
            counts = np.floor(np.asarray(p) * n).astype(int)
            counts[np.argmax(p)] += n - counts.sum()
            idx = np.concatenate([self._draw_source(s, c, rng) for s, c in enumerate(counts) if c])
            Xs, ys = self.task.X[idx], self.task.y[idx]
            if len(np.unique(ys)) < 2:
                accs.append(float(np.mean(self.yt == ys[0])))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(max_iter=300, C=1.0).fit(Xs, ys)
            accs.append(float(clf.score(self.Xt, self.yt)))
        return float(np.mean(accs))


def fit_and_score(P, ot_vals, y, train, test, ridge: float = 0.0) -> tuple[ProjektorPredictor, float, float]:
    pred = ProjektorPredictor.fit(P[train], ot_vals[train], y[train], ridge=ridge)
    yhat = pred.predict(P[test], ot_vals[test])
    return pred, mean_absolute_error(y[test], yhat), r2_score(y[test], yhat)


def run(task: Task, seed: int = 0) -> dict:
    t0 = time.time()
    ex = Experiment(task, seed)
    P = simplex_grid()
    ot_vals = np.array([ex.mot.distance(p)[0] for p in P])
    acc = {}
    for n in (task.n0, task.n1):
        acc[n] = np.array([ex.accuracy(p, n, seed=1000 + i) for i, p in
                           enumerate(tqdm(P, desc=f"{task.name} pilots N={n}"))])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(P))
    splits = {"random": (perm[: 2 * len(P) // 3], perm[2 * len(P) // 3:]),
              "region p2>=0.5": (np.flatnonzero(P[:, 1] < 0.5), np.flatnonzero(P[:, 1] >= 0.5))}
    out: dict = {"task": task.name, "n0": task.n0, "n1": task.n1, "n": task.n_big,
                 "points": len(task.y), "predictor": {}}
    for split, (tr, te) in splits.items():
        for n in (task.n0, task.n1):
            # ridge 0 is the paper's plain least squares; 0.01 shows what shrinkage buys.
            for ridge in (0.0, 0.01):
                _, mae, r2 = fit_and_score(P, ot_vals, acc[n], tr, te, ridge)
                out["predictor"][f"{split} N={n} ridge={ridge}"] = {
                    "mae": mae, "r2": r2, "train": len(tr), "test": len(te)}
    # Both predictors on all pilots, projected to n_big.
    pred0 = ProjektorPredictor.fit(P, ot_vals, acc[task.n0])
    pred1 = ProjektorPredictor.fit(P, ot_vals, acc[task.n1])
    sp = ScalingPredictor(pred0, pred1, task.n0, task.n1)
    check = P[rng.choice(len(P), 12, replace=False)]
    check_ot = np.array([ex.mot.distance(p)[0] for p in check])
    measured = np.array([ex.accuracy(p, task.n_big, seed=5000 + i) for i, p in
                         enumerate(tqdm(check, desc=f"{task.name} measure N={task.n_big}"))])
    projected = sp.predict(check, check_ot, check_ot, task.n_big)
    idx = [int(np.flatnonzero((P == p).all(1))[0]) for p in check]
    direct = extrapolate(acc[task.n0][idx], acc[task.n1][idx], task.n0, task.n1, task.n_big)
    out["extrapolation"] = {
        "mae_predictor_projection": mean_absolute_error(measured, projected),
        "r2_predictor_projection": r2_score(measured, projected),
        "mae_measured_pilots_projection": mean_absolute_error(measured, direct),
        "mae_use_n1_as_is": mean_absolute_error(measured, acc[task.n1][idx]),
        "mean_measured": float(measured.mean()),
    }

    def objective(p):
        v, g = ex.mot.distance(p)
        return float(sp.predict(p[None], v, v, task.n_big)[0]), sp.gradient(p, v, g, task.n_big)

    res = optimize_mixture(objective, np.full(3, 1 / 3), steps=40, lr=0.2, maximize=True)
    best_pilot = P[int(np.argmax(acc[task.n1]))]
    # OT alone, no pilots: the mixture closest to the target.
    closest = optimize_mixture(ex.mot.distance, np.full(3, 1 / 3), steps=40, lr=0.2).p
    arms = {"optimized": res.p, "min OT (no pilots)": closest, "uniform": np.full(3, 1 / 3),
            "best pilot (N1)": best_pilot}
    out["optimization"] = {}
    for name, p in arms.items():
        out["optimization"][name] = {
            "p": [round(float(x), 3) for x in p],
            "predicted": float(sp.predict(p[None], *(2 * [ex.mot.distance(p)[0]]), task.n_big)[0]),
            "measured": ex.accuracy(p, task.n_big, seed=9000),
        }
    out["ot_range"] = [float(ot_vals.min()), float(ot_vals.max())]
    out["corr_ot_accuracy_n1"] = float(np.corrcoef(ot_vals, acc[task.n1])[0, 1])
    out["seconds"] = time.time() - t0
    plot(task, measured, projected, direct, P, acc, ot_vals)
    return out


def plot(task, measured, projected, direct, P, acc, ot_vals) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    pred1 = ProjektorPredictor.fit(P, ot_vals, acc[task.n1]).predict(P, ot_vals)
    axes[0].scatter(pred1, acc[task.n1], s=12)
    lo, hi = acc[task.n1].min(), acc[task.n1].max()
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=1)
    axes[0].set(xlabel="predicted accuracy", ylabel="measured accuracy",
                title=f"{task.name}: fit at N1={task.n1}")
    axes[1].scatter(projected, measured, s=14, label="predictor, projected")
    axes[1].scatter(direct, measured, s=14, marker="x", label="measured pilots, projected")
    lo, hi = measured.min(), measured.max()
    axes[1].plot([lo, hi], [lo, hi], "k--", lw=1)
    axes[1].set(xlabel=f"projected accuracy at N={task.n_big}", ylabel="measured accuracy",
                title="log-N extrapolation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, f"ot_validation_{task.name}.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="Projektor OT mixture validation")
    ap.add_argument("--task", nargs="+", default=["digits", "text"], choices=["digits", "text"])
    ap.add_argument("--model", default=None, help="local sentence-embedding model folder (text task)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.task:
        task = digits_task() if name == "digits" else text_task(args.model)
        print(json.dumps(run(task, args.seed), indent=1))


if __name__ == "__main__":
    main()
