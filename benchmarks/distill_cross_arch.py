"""Cross-architecture evaluation of distilled digits: distil on one network, train another.

scikit-learn's digits, the split of ``distill_evaluation.py`` (70/30,
``random_state=0``), with 15% of the training part held out as a validation
split for the baselines' learning rate. For each source architecture (MLP
64-128-128-10 on flat pixels, ConvNet 2 blocks width 32 on 1x8x8 images) AST
experts are trained (5 x 20 epochs) and the data distilled at 1 and 10 images
per class (AST recipe, ``--iterations``; the AST weight perturbation moves the
ConvNet's kernels and leaves the MLP as it is; ``--dsa`` adds DSA for the
ConvNet's experts and inner loop). Each synthetic set is then evaluated on
*both* architectures (MTT's protocol, learned step size, 3 fresh networks),
against a random real subset of the same size whose learning rate is tuned
on the validation split for each architecture. 3 seeds; per-seed numbers and
paired differences (cross-architecture minus same-architecture, and
distilled minus random) with 95% t-intervals.

Run: ``nice -n 10 .venv/bin/python benchmarks/distill_cross_arch.py`` (about
20 minutes on one busy core; ``--quick`` about 1).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from gristmill.trainers.distill import (
    DistillConfig,
    Normalizer,
    distill_dataset,
    model_factory,
    train_and_evaluate,
)
from gristmill.trainers.experts import ExpertConfig, train_experts

HERE = Path(__file__).resolve().parent
ARCHS = ("mlp", "convnet")
LRS = [0.003, 0.01, 0.03, 0.1]
SHAPE = {"mlp": (64,), "convnet": (1, 8, 8)}


def interval(x) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def main() -> None:
    ap = argparse.ArgumentParser(description="cross-architecture evaluation of distilled digits")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--eval-nets", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=300)
    ap.add_argument("--dsa", action="store_true", help="DSA for the ConvNet's experts and inner loop")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "_work" / "distill_cross_arch.json"))
    args = ap.parse_args()
    if args.quick:
        args.ipc, args.seeds, args.iterations, args.eval_nets, args.eval_epochs = [1], 2, 3, 1, 20
    torch.set_num_threads(1)
    t0 = time.time()
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.3,
                                              random_state=0, stratify=y)
    x_fit, x_va, y_fit, y_va = train_test_split(x_tr, y_tr, test_size=0.15, random_state=0, stratify=y_tr)
    # Each architecture standardises as distill_dataset does (per pixel for the MLP, per
    # channel for the ConvNet); a synthetic set crosses over in pixel units.
    norms = {a: Normalizer.fit(x_fit.reshape(-1, *SHAPE[a]), image=a == "convnet") for a in ARCHS}

    def tensors(a: np.ndarray, arch: str) -> torch.Tensor:
        return torch.from_numpy(norms[arch].transform(a.reshape(-1, *SHAPE[arch])).astype(np.float32))

    factories = {a: model_factory(a, SHAPE[a], 10) for a in ARCHS}

    def evaluate(xs: np.ndarray, ys: np.ndarray, arch: str, lr: float, split: str = "test") -> float:
        xe, ye = (x_te, y_te) if split == "test" else (x_va, y_va)
        xt, yt = tensors(xs, arch), torch.from_numpy(ys.astype(np.int64))
        return float(np.mean([train_and_evaluate(factories[arch](1000 + s), xt, yt, tensors(xe, arch),
                                                 torch.from_numpy(ye), lr=lr, epochs=args.eval_epochs,
                                                 seed=s) for s in range(args.eval_nets)]))

    res: dict = {}
    for src in ARCHS:
        dsa = args.dsa and src == "convnet"
        cfg_e = ExpertConfig.ast(num_experts=2 if args.quick else 5, epochs=12 if args.quick else 20,
                                 lr=0.01, dsa=dsa)
        traj = train_experts(factories[src], tensors(x_fit, src), torch.from_numpy(y_fit), cfg_e, seed=100,
                             progress=False)
        for ipc in args.ipc:
            for seed in range(args.seeds):
                cfg = DistillConfig.ast(ipc=ipc, iterations=args.iterations, syn_steps=20, expert_epochs=2,
                                        max_start_epoch=10, lr_images=10.0, lr_init=0.01, seed=seed, dsa=dsa)
                out = distill_dataset(x_fit, y_fit, model=src, image_shape=SHAPE[src] if src == "convnet" else None,
                                      experts=cfg_e, config=cfg, trajectories=traj, progress=False)
                xs = out.x_syn.reshape(len(out.x_syn), -1)
                for dst in ARCHS:
                    res.setdefault(f"distilled on {src}", {}).setdefault(f"{dst} {ipc}", []).append(
                        evaluate(xs, np.asarray(out.y_syn), dst, out.lr))
                print(f"[{time.time() - t0:.0f}s] {src} ipc={ipc} seed={seed} lr={out.lr:.4f} "
                      + str({k: round(v[-1], 3) for k, v in res[f'distilled on {src}'].items()
                             if k.endswith(f' {ipc}')}), flush=True)
    for ipc in args.ipc:
        subsets = [np.concatenate([np.random.default_rng(s).permutation(np.flatnonzero(y_fit == c))[:ipc]
                                   for c in range(10)]) for s in range(args.seeds)]
        for dst in ARCHS:
            lr = max(LRS, key=lambda lr, i=subsets[0]: evaluate(x_fit[i], y_fit[i], dst, lr, "val"))
            res.setdefault("random real (tuned lr)", {})[f"{dst} {ipc}"] = [
                evaluate(x_fit[i], y_fit[i], dst, lr) for i in subsets]
            res.setdefault("random real lr", {})[f"{dst} {ipc}"] = lr
    print(table(res, args.ipc))
    print(f"elapsed {(time.time() - t0) / 60:.1f} min")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res))


def table(res: dict, ipcs: list[int]) -> str:
    cols = [f"{dst} {ipc}" for ipc in ipcs for dst in ARCHS]
    lines = ["| trained on → evaluated on | " + " | ".join(f"{c.split()[0]}, {c.split()[1]} per class"
                                                          for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for row in ("distilled on mlp", "distilled on convnet", "random real (tuned lr)"):
        cells = []
        for c in cols:
            v = 100 * np.asarray(res[row][c])
            cells.append(f"{', '.join(f'{a:.1f}' for a in v)} / **{v.mean():.1f}**")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| random real: tuned lr | " + " | ".join(str(res["random real lr"][c]) for c in cols) + " |")
    for ipc in ipcs:
        for src, dst in (("mlp", "convnet"), ("convnet", "mlp")):
            cross = np.asarray(res[f"distilled on {src}"][f"{dst} {ipc}"])
            same = np.asarray(res[f"distilled on {dst}"][f"{dst} {ipc}"])
            rand = np.asarray(res["random real (tuned lr)"][f"{dst} {ipc}"])
            a, b = interval(100 * (cross - same)), interval(100 * (cross - rand))
            lines.append(f"\n{ipc} per class, distilled on {src}, evaluated on {dst}: minus distilled on {dst} "
                         f"{a[0]:+.1f} [{a[1]:+.1f}, {a[2]:+.1f}]; minus random real {b[0]:+.1f} "
                         f"[{b[1]:+.1f}, {b[2]:+.1f}] (paired by seed)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
