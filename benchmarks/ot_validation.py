"""Validate Projektor-style mixture prediction and optimization, over independent draws.

After Kang et al., "Performance Scaling via Optimal Transport: Enabling Data
Selection from Partially Revealed Sources" (NeurIPS 2023). Three tasks, all
offline:

``digits``  scikit-learn's ``load_digits``; three sources with skewed class
            priors (97% of each source's mass on a third of the classes), a
            balanced target; the "model" is logistic regression and the
            performance its target accuracy.
``text``    the same on docstrings of six Python standard-library packages
            (labels = package), hashed character 3-5-gram embeddings.
``docs``    real documentation, no labels: sources = three English Debian
            manuals (debian-reference, developers-reference, the aptitude
            manual), target = a fourth (debian-handbook); a document is a
            section of a page; the model is an interpolated byte 4-gram
            language model (Witten-Bell) trained on the sample, and the
            performance its bits per byte on held-out target documents
            (lower is better). Which mixture is best is not known in advance.

Per draw (independent target split, source streams and pilot samples):

* 21 pilot mixtures (the 0.2-grid of the simplex) at sizes N0 < N1; every
  pilot trains on its own sample D(N, p) (n_i = N p_i) and its OT feature is
  computed on that same sample (``SampledMixtureOT``: exact ``ot.emd`` under
  5k points), label-free (``euclidean``) and, for the labelled tasks,
  label-aware (``otdd``: OTDD with exact inner OT between classes);
* predictors: Projektor's pseudo-quadratic in (p, OT) per cost, and the
  no-OT baseline, a full quadratic in p fitted on the same pilots; their
  held-out-mixture error by leave-one-out over the 21 pilots at N1;
* extrapolation to N = 4 N1 with the parameter-free log-N projection of both
  fitted predictors, on 8 random mixtures measured at N;
* optimization at N: projected gradient on the projected Projektor predictor
  (gradient from the OT dual potentials of the samples at N0 and N1), the
  same for the no-OT quadratic, the mixture of least OT to the target at N
  (no pilots), uniform, and the best pilot at N1; each measured at N on 3
  fresh samples.

Reported: per-draw numbers, mean ± std over draws, and paired differences
(arm - uniform, arm - best pilot) with 95% t-intervals.

Run: ``nice -n 10 .venv/bin/python benchmarks/ot_validation.py [--task digits text docs]
[--draws 5] [--quick]``
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mean_absolute_error, r2_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_docs import corpus_documents  # noqa: E402

from gristmill.scorers.embeddings import make_embedder  # noqa: E402
from gristmill.selectors.ot_mixture import (  # noqa: E402
    ProjektorPredictor,
    SampledMixtureOT,
    ScalingPredictor,
    extrapolate,
    optimize_mixture,
    sample_counts,
)

HERE = Path(__file__).resolve().parent
TEXT_PACKAGES = ["tkinter", "distutils", "asyncio", "email", "_pydecimal", "logging"]
DOC_SOURCES = ["debian-reference", "developers-reference", "aptitude"]
DOC_TARGET = "debian-handbook"


# ------------------------------------------------------------------ tasks

@dataclass
class Task:
    name: str
    X: np.ndarray            # embeddings of every item
    y: np.ndarray | None     # class labels (None: unlabelled, an LM task)
    n0: int
    n1: int
    per_class_target: int = 0
    texts: list[str] | None = None
    source_of: np.ndarray | None = None  # docs: corpus index of every item (3 = target)
    higher_is_better: bool = True


def digits_task() -> Task:
    d = load_digits()
    return Task("digits", d.data / 16.0, d.target, n0=100, n1=200, per_class_target=50)


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


def text_task() -> Task:
    texts, y = stdlib_docstrings()
    X = make_embedder(None, dim=256).embed(texts).astype(np.float64)
    return Task("text", X, y, n0=100, n1=200, per_class_target=40)


def docs_task() -> Task:
    texts, source_of = [], []
    for s, corpus in enumerate([*DOC_SOURCES, DOC_TARGET]):
        docs = corpus_documents(corpus, "en")
        if len(docs) < 50:
            raise SystemExit(f"{corpus} (en) not installed; see benchmarks/debian_docs.py")
        texts += docs
        source_of += [s] * len(docs)
    X = make_embedder(None, dim=256).embed(texts).astype(np.float64)
    return Task("docs", X, None, n0=20, n1=40, texts=texts, source_of=np.asarray(source_of),
                higher_is_better=False)


# ------------------------------------------------------- the byte 4-gram LM

class ByteNgramLM:
    """Interpolated Witten-Bell byte n-gram model (Witten and Bell 1991; Chen and Goodman 1998):

        P_k(c | h) = (C(h c) + T(h) P_{k-1}(c | h')) / (C(h) + T(h)),

    h the last k - 1 bytes, h' its last k - 2, T(h) the distinct bytes seen
    after h; P_1 is add-one over the 256 bytes.
    """

    def __init__(self, texts: list[str], order: int = 4) -> None:
        self.order = order
        data = self._bytes(texts)
        self.tables = []
        for k in range(1, order + 1):
            ids = self._grams(data, k)
            grams, counts = np.unique(ids, return_counts=True)
            ctx = grams >> 8
            ctx_u, ctx_start = np.unique(ctx, return_index=True)
            ctx_total = np.add.reduceat(counts, ctx_start) if len(ctx_start) else np.zeros(0, np.int64)
            ctx_types = np.diff(np.append(ctx_start, len(grams)))
            self.tables.append((grams, counts, ctx_u, ctx_total, ctx_types))

    @staticmethod
    def _bytes(texts: list[str]) -> np.ndarray:
        # Documents joined by a 0 byte, which also pads the start.
        return np.frombuffer(b"\0\0\0" + b"\0".join(t.encode() for t in texts), dtype=np.uint8).astype(np.int64)

    def _grams(self, data: np.ndarray, k: int) -> np.ndarray:
        ids = np.zeros(len(data) - self.order + 1, dtype=np.int64)
        for j in range(k):
            ids = (ids << 8) | data[self.order - k + j: len(data) - k + 1 + j]
        return ids

    def bits_per_byte(self, texts: list[str]) -> float:
        data = self._bytes(texts)
        p = None
        for k in range(1, self.order + 1):
            grams, counts, ctx_u, ctx_total, ctx_types = self.tables[k - 1]
            ids = self._grams(data, k)
            i = np.clip(np.searchsorted(grams, ids), 0, max(len(grams) - 1, 0))
            c = np.where(grams[i] == ids, counts[i], 0) if len(grams) else np.zeros(len(ids))
            j = np.clip(np.searchsorted(ctx_u, ids >> 8), 0, max(len(ctx_u) - 1, 0))
            hit = ctx_u[j] == (ids >> 8) if len(ctx_u) else np.zeros(len(ids), bool)
            total = np.where(hit, ctx_total[j], 0)
            types = np.where(hit, ctx_types[j], 0)
            if p is None:
                p = (c + 1.0) / (total + 256.0)
            else:
                p = np.where(total > 0, (c + types * p) / np.maximum(total + types, 1), p)
        return float(-np.log2(p).mean())


# ------------------------------------------------------------ one draw

class Draw:
    """One independent draw: target split, source streams, sample-based OT."""

    def __init__(self, task: Task, seed: int, n_max: int) -> None:
        self.task = task
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        if task.y is not None:
            classes = np.unique(task.y)
            target_idx = np.concatenate([rng.choice(np.flatnonzero(task.y == c), task.per_class_target,
                                                    replace=False) for c in classes])
            pool = np.ones(len(task.y), bool)
            pool[target_idx] = False
            self.target_idx = self.test_idx = target_idx
            class_pools = [np.flatnonzero(pool & (task.y == c)) for c in classes]
            priors = source_priors(len(classes))
            # Streams of 4 n_max draws per source: D(N, p) for N <= n_max, 3 fresh
            # measurement samples beyond, all i.i.d. from the source's distribution.
            self.streams = []
            for s in range(3):
                cls = rng.choice(len(classes), size=4 * n_max, p=priors[s])
                self.streams.append(np.array([rng.choice(class_pools[c]) for c in cls]))
            labels = [task.y[s] for s in self.streams]
            costs = ("euclidean", "otdd")
        else:
            target = np.flatnonzero(task.source_of == 3)
            target = rng.permutation(target)
            self.target_idx, self.test_idx = target[:150], target[150:450]
            self.streams = [rng.choice(np.flatnonzero(task.source_of == s), size=4 * n_max)
                            for s in range(3)]
            labels = None
            costs = ("euclidean",)
        tgt_labels = None if task.y is None else task.y[self.target_idx]
        self.sot = {c: SampledMixtureOT([task.X[s] for s in self.streams], task.X[self.target_idx],
                                        labels, tgt_labels, cost=c) for c in costs}
        self.n_max = n_max

    def indices(self, p: np.ndarray, n: int, rep: int = 0) -> np.ndarray:
        """Rows of D(n, p); rep 0 is the nested sample OT sees, rep r >= 1 a fresh one."""
        counts = sample_counts(p, n)
        off = 0 if rep == 0 else self.n_max + (rep - 1) * self.n_max
        return np.concatenate([s[off:off + c] for s, c in zip(self.streams, counts, strict=True)])

    def performance(self, p: np.ndarray, n: int, rep: int = 0) -> float:
        idx = self.indices(p, n, rep)
        task = self.task
        if task.y is None:
            lm = ByteNgramLM([task.texts[i] for i in idx])
            return lm.bits_per_byte([task.texts[i] for i in self.test_idx])
        Xs, ys = task.X[idx], task.y[idx]
        yt = task.y[self.test_idx]
        if len(np.unique(ys)) < 2:
            return float(np.mean(yt == ys[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=300, C=1.0).fit(Xs, ys)
        return float(clf.score(task.X[self.test_idx], yt))


def source_priors(num_classes: int, num_sources: int = 3, major: float = 0.97) -> np.ndarray:
    groups = np.array_split(np.arange(num_classes), num_sources)
    pri = np.zeros((num_sources, num_classes))
    for s, g in enumerate(groups):
        pri[s] = (1 - major) / (num_classes - len(g))
        pri[s, g] = major / len(g)
    return pri


def simplex_grid(step: float) -> np.ndarray:
    k = round(1 / step)
    return np.array([[i / k, j / k, (k - i - j) / k] for i in range(k + 1) for j in range(k + 1 - i)])


# ------------------------------------------------- the no-OT baseline

@dataclass
class QuadraticPredictor:
    """Full quadratic in the m - 1 free ratios z: c + w.z + z^T A z (the no-OT baseline)."""

    coef: np.ndarray

    @staticmethod
    def features(P: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(P)[:, :-1]
        k = z.shape[1]
        cross = [z[:, i] * z[:, j] for i in range(k) for j in range(i, k)]
        return np.column_stack([np.ones(len(z)), z, *cross])

    @classmethod
    def fit(cls, P: np.ndarray, y: np.ndarray) -> QuadraticPredictor:
        return cls(np.linalg.lstsq(cls.features(P), y, rcond=None)[0])

    def predict(self, P: np.ndarray) -> np.ndarray:
        return self.features(P) @ self.coef

    def gradient(self, p: np.ndarray, h: float = 1e-6) -> np.ndarray:
        g = np.zeros_like(p)
        for i in range(len(p) - 1):
            d = np.zeros_like(p)
            d[i], d[-1] = h, -h
            g[i] = (self.predict(p + d)[0] - self.predict(p - d)[0]) / (2 * h)
        return g


def loo(fit_predict, P: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Leave-one-out MAE and R^2 over the pilots."""
    pred = np.array([fit_predict(np.delete(np.arange(len(P)), i), i) for i in range(len(P))])
    return float(mean_absolute_error(y, pred)), float(r2_score(y, pred))


# ------------------------------------------------------------------ run

def run_draw(task: Task, seed: int, steps: int, n_test: int) -> dict:
    t0 = time.time()
    n0, n1 = task.n0, task.n1
    n_big = 4 * n1
    d = Draw(task, seed, n_big)
    sign = 1.0 if task.higher_is_better else -1.0
    P = simplex_grid(0.2)
    perf = {n: np.array([d.performance(p, n) for p in P]) for n in (n0, n1)}
    ot_vals = {c: {n: np.array([s.distance(p, n)[0] for p in P]) for n in (n0, n1)}
               for c, s in d.sot.items()}
    out: dict = {"seed": seed, "n0": n0, "n1": n1, "n": n_big, "predictor_loo_n1": {},
                 "extrapolation": {}, "arms": {}}
    for c in d.sot:
        out["predictor_loo_n1"][f"projektor ({c})"] = loo(
            lambda tr, te, c=c: ProjektorPredictor.fit(P[tr], ot_vals[c][n1][tr], perf[n1][tr]).predict(
                P[te][None], ot_vals[c][n1][te])[0], P, perf[n1])
        out[f"corr_ot_{c}_n1"] = float(np.corrcoef(ot_vals[c][n1], perf[n1])[0, 1])
    out["predictor_loo_n1"]["quadratic in p (no OT)"] = loo(
        lambda tr, te: QuadraticPredictor.fit(P[tr], perf[n1][tr]).predict(P[te][None])[0], P, perf[n1])

    # Extrapolation to n_big on random mixtures.
    test_p = d.rng.dirichlet(np.ones(3), size=n_test)
    measured = np.array([d.performance(p, n_big, rep=1) for p in test_p])
    sp = {c: ScalingPredictor(ProjektorPredictor.fit(P, ot_vals[c][n0], perf[n0]),
                              ProjektorPredictor.fit(P, ot_vals[c][n1], perf[n1]), n0, n1) for c in d.sot}
    quad = {n: QuadraticPredictor.fit(P, perf[n]) for n in (n0, n1)}
    preds = {f"projektor ({c})": np.array([sp[c].predict(p[None], s.distance(p, n0)[0], s.distance(p, n1)[0],
                                                         n_big)[0] for p in test_p])
             for c, s in d.sot.items()}
    preds["quadratic in p (no OT)"] = extrapolate(quad[n0].predict(test_p), quad[n1].predict(test_p), n0, n1, n_big)
    preds["quadratic fit at N1, not projected"] = quad[n1].predict(test_p)
    for k, v in preds.items():
        out["extrapolation"][k] = (float(mean_absolute_error(measured, v)), float(r2_score(measured, v)))

    def projektor_objective(c):
        s = d.sot[c]

        def f(p):
            v0, g0 = s.distance(p, n0)
            v1, g1 = s.distance(p, n1)
            return (float(sp[c].predict(p[None], v0, v1, n_big)[0]),
                    sp[c].gradient(p, v0, g0, n_big, ot_n1=(v1, g1)))
        return f

    def quad_objective(p):
        val = extrapolate(quad[n0].predict(p[None]), quad[n1].predict(p[None]), n0, n1, n_big)[0]
        return float(val), extrapolate(quad[n0].gradient(p), quad[n1].gradient(p), n0, n1, n_big)

    maximize = task.higher_is_better
    u = np.full(3, 1 / 3)
    arms = {"uniform": u, "best pilot (N1)": P[int(np.argmax(sign * perf[n1]))]}
    for c in d.sot:
        arms[f"optimized, projektor ({c})"] = optimize_mixture(projektor_objective(c), u, steps=steps,
                                                               lr=0.2, maximize=maximize).p
        arms[f"min OT ({c}), no pilots"] = optimize_mixture(lambda p, s=d.sot[c]: s.distance(p, n_big), u,
                                                            steps=steps, lr=0.2).p
    arms["optimized, quadratic (no OT)"] = optimize_mixture(quad_objective, u, steps=steps, lr=0.2,
                                                            maximize=maximize).p
    for name, p in arms.items():
        out["arms"][name] = {"p": [round(float(x), 3) for x in p],
                             "measured": float(np.mean([d.performance(p, n_big, rep=r) for r in (1, 2, 3)]))}
    out["seconds"] = time.time() - t0
    return out


def interval(x) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def report(task: Task, draws: list[dict]) -> str:
    lines = [f"### {task.name}: {len(draws)} draws, N0 = {task.n0}, N1 = {task.n1}, N = {4 * task.n1}"
             f" ({'accuracy, higher is better' if task.higher_is_better else 'target bits per byte, lower is better'})",
             "", "| arm | per draw | mean ± std | − uniform [95% CI] | − best pilot [95% CI] |", "|---|---|---|---|---|"]
    arms = list(draws[0]["arms"])
    for a in arms:
        v = np.array([r["arms"][a]["measured"] for r in draws])
        u = np.array([r["arms"]["uniform"]["measured"] for r in draws])
        b = np.array([r["arms"]["best pilot (N1)"]["measured"] for r in draws])
        ci = [interval(v - u), interval(v - b)]
        lines.append(f"| {a} | {', '.join(f'{x:.3f}' for x in v)} | {v.mean():.3f} ± {v.std(ddof=1):.3f} | "
                     + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in ci) + " |")
    lines += ["", "| predictor | leave-one-out R² at N1 (per draw) | extrapolation to 4 N1: MAE | R² (per draw) |",
              "|---|---|---|---|"]
    for k in draws[0]["extrapolation"]:
        loo_r2 = [r["predictor_loo_n1"][k][1] for r in draws] if k in draws[0]["predictor_loo_n1"] else None
        mae = [r["extrapolation"][k][0] for r in draws]
        r2 = [r["extrapolation"][k][1] for r in draws]
        lines.append(f"| {k} | " + (f"{np.mean(loo_r2):.2f} ({', '.join(f'{x:.2f}' for x in loo_r2)})"
                                    if loo_r2 else "") + f" | {np.mean(mae):.3f} | {np.mean(r2):.2f} "
                     f"({', '.join(f'{x:.2f}' for x in r2)}) |")
    corr = {k: [r[k] for r in draws] for k in draws[0] if k.startswith("corr_ot")}
    lines.append("")
    lines.append("corr(OT, performance) at N1 per draw: " + "; ".join(
        f"{k[8:-3]}: {', '.join(f'{x:.2f}' for x in v)}" for k, v in corr.items())
        + f". Wall time: {sum(r['seconds'] for r in draws) / 60:.1f} min.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="Projektor OT mixture validation over independent draws")
    ap.add_argument("--task", nargs="+", default=["digits", "docs"], choices=["digits", "text", "docs"])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15, help="projected-gradient steps per optimization")
    ap.add_argument("--test-mixtures", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="1 draw, few steps")
    ap.add_argument("--from-json", help="print the tables of a saved run (benchmarks/_work/ot_validation.json)")
    ap.add_argument("--out", default=str(HERE / "_work" / "ot_validation.json"), help="where the run is saved")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        for name, draws in saved.items():
            for r in draws:  # the label an earlier version of this script used
                r["extrapolation"] = {("quadratic fit at N1, not projected" if k == "N1 pilot value as is" else k): v
                                      for k, v in r["extrapolation"].items()}
            task = Task(name, np.zeros((0, 0)), None, n0=draws[0]["n0"], n1=draws[0]["n1"],
                        higher_is_better=name != "docs")
            print(report(task, draws))
        return
    if args.quick:
        args.draws, args.steps, args.test_mixtures = 1, 3, 3
    torch.set_num_threads(1)
    all_out = {}
    for name in args.task:
        task = {"digits": digits_task, "text": text_task, "docs": docs_task}[name]()
        draws = []
        for seed in range(args.draws):
            draws.append(run_draw(task, seed, args.steps, args.test_mixtures))
            print(json.dumps(draws[-1]), flush=True)
        all_out[name] = draws
        print(report(task, draws), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(all_out, f)


if __name__ == "__main__":
    main()
