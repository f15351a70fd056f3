"""``gristmill distill``: distil a labelled set of features or images into a few examples.

.. code-block:: console

    gristmill distill --dataset digits --ipc 10 --output out/distill-digits
    gristmill distill --input feats.parquet --feature-column emb --label-column topic \\
        --ipc 1 --no-weight-perturb --output out/topics
    gristmill distill --dataset topics --write-dataset data/topics/topics.jsonl

Writes ``synthetic.parquet``, ``learned_lr.json``, ``report.png`` (see
``gristmill.trainers.distill_output``) and ``experts.pt`` (the expert
trajectories) into the output folder. With ``--evaluate`` a fifth of the
input is held out and fresh networks trained on the synthetic set, on a
random real subset of the same size and on the full remaining data are
tested on it; the accuracies go into ``evaluation.json``.

Built-in data sets, nothing downloaded:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
    as 64 features (``--model mlp``) or 1x8x8 images (``--model convnet``).
``topics``
    a generated labelled text set: sentences about five topics written from
    topic and shared vocabularies (with words borrowed across topics), as
    256 hashed word uni- and bigram features (``HashingVectorizer``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from gristmill.cli.errors import CommandError, config_error
from gristmill.trainers.distill_data import (
    DATASETS,
    builtin_dataset,
    column_as_matrix,
    write_dataset_jsonl,
)

# torch, scikit-learn and matplotlib are imported where used: building the
# `gristmill` parser imports this module for every command.
MODEL_KINDS = ("mlp", "convnet")


def read_table(path: Path) -> pa.Table:
    if path.suffix in (".parquet", ".pq"):
        return pq.read_table(path)
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return pajson.read_json(path)
    raise ValueError(f"--input must be .parquet or .jsonl, got {path}")


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--image-shape must be C,H,W (like 1,8,8), got {text!r}")
    return shape


def _configs(args: argparse.Namespace) -> tuple:
    from gristmill.trainers.distill import DistillConfig
    from gristmill.trainers.experts import ExpertConfig

    expert_over = {"num_experts": args.num_experts, "epochs": args.train_epochs,
                   "lr": args.expert_lr, "batch_size": args.expert_batch_size}
    experts = (ExpertConfig.ast if args.experts == "ast" else ExpertConfig.mtt)(**expert_over)
    config = DistillConfig(
        ipc=args.ipc, iterations=args.iterations, syn_steps=args.syn_steps,
        expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
        lr_images=args.lr_images, lr_lr=args.lr_lr, lr_init=args.lr_init, batch_syn=args.batch_syn,
        init=args.init, balanced_loss=args.balanced_loss,
        intermediate_matching=args.intermediate_matching, weight_perturb=args.weight_perturb,
        perturb_mode=args.perturb_mode, perturb_scale=args.perturb_scale, student_momentum=args.student_momentum, seed=args.seed)
    return experts, config


def _evaluate(args: argparse.Namespace, outcome, x_tr, y_tr, x_te, y_te, shape) -> dict:
    import torch

    from gristmill.trainers.distill import train_and_evaluate
    from gristmill.trainers.distill_models import build_model

    torch.set_num_threads(args.threads)
    norm = outcome.normalizer
    classes = outcome.classes

    def prep(a: np.ndarray) -> torch.Tensor:
        a = np.asarray(a, np.float32)
        return torch.from_numpy(norm.transform(a.reshape(len(a), *shape) if shape else a))

    def labels(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(classes, v).astype(np.int64))

    xt, yt = prep(x_te), labels(y_te)
    rng = np.random.default_rng(args.seed)
    codes = np.searchsorted(classes, y_tr)
    rand_idx = np.concatenate([rng.permutation(np.flatnonzero(codes == c))[:args.ipc]
                               for c in range(len(classes))])
    arms = {"distilled": (outcome.x_syn, outcome.y_syn, outcome.lr),
            "random_real": (x_tr[rand_idx], y_tr[rand_idx], args.expert_lr),
            "full_data": (x_tr, y_tr, args.expert_lr)}
    out = {}
    for arm, (xa, ya, lr) in arms.items():
        accs = [train_and_evaluate(build_model(args.model, xt.shape[1:], len(classes), seed=s),
                                   prep(xa), labels(ya), xt, yt, lr=lr, epochs=300, seed=s)
                for s in range(args.eval_seeds)]
        out[arm] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs),
                    "rows": int(len(ya)), "lr": lr}
    return out


def run_distill(args: argparse.Namespace) -> int:
    """Entry point of ``gristmill distill``; returns the exit code."""
    from gristmill.trainers.distill import distill_dataset
    from gristmill.trainers.distill_output import distill_artifacts

    if args.dataset:
        x, y, texts, shape = builtin_dataset(args.dataset)
        if args.write_dataset:
            write_dataset_jsonl(Path(args.write_dataset), x, y, texts, args.dataset)
            print(f"wrote {len(y)} records to {args.write_dataset}")
            return 0
        draw_shape = shape
        if args.model == "mlp":
            shape = None
    else:
        table = read_table(Path(args.input))
        for col in (args.feature_column, args.label_column):
            if col not in table.column_names:
                raise CommandError(f"distill: --input {args.input} has no column {col!r}; it "
                                   f"has {table.column_names}")
        x = column_as_matrix(table.column(args.feature_column), args.feature_column)
        y = table.column(args.label_column).to_numpy(zero_copy_only=False)
        shape = draw_shape = args.image_shape
    if args.model == "convnet" and shape is None:
        raise CommandError("distill: --model convnet needs images: pass --image-shape C,H,W")
    experts, config = _configs(args)
    x_te = y_te = None
    if args.evaluate:
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(y))
        cut = len(y) // 5
        x_te, y_te, x, y = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    outcome = distill_dataset(x, y, model=args.model, image_shape=shape, experts=experts,
                              config=config, threads=args.threads, progress=not args.quiet)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in distill_artifacts(outcome, x.reshape(len(x), -1), y,
                                             draw_shape).items():
        tmp = out / (name + ".tmp")
        tmp.write_bytes(content)
        tmp.replace(out / name)
    outcome.trajectories.save(out / "experts.pt")
    print(f"synthetic set: {len(outcome.y_syn)} rows ({config.ipc} per class x "
          f"{len(outcome.classes)} classes), learned step size {outcome.lr:.5g} -> {out}")
    if args.evaluate:
        result = _evaluate(args, outcome, x, y, x_te, y_te, shape)
        (out / "evaluation.json").write_text(json.dumps(result, indent=2))
        for arm, r in result.items():
            print(f"  {arm:12s} {r['rows']:5d} rows  test accuracy {r['mean']:.4f} "
                  f"+- {r['std']:.4f} ({r['n']} seeds)")
    return 0


def _cli(args: argparse.Namespace) -> int:
    try:
        return run_distill(args)
    except ValueError as e:
        raise CommandError(f"distill: {e}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``gristmill distill``."""
    p = sub.add_parser("distill", help="dataset distillation by trajectory matching (MTT + AST)",
                       description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="parquet or jsonl file with a feature and a label column")
    src.add_argument("--dataset", choices=DATASETS, help="a built-in data set")
    p.add_argument("--write-dataset", metavar="PATH",
                   help="write the --dataset as JSONL (id, text, features, label) and stop")
    p.add_argument("--feature-column", default="features",
                   help="list column of the features (--input)")
    p.add_argument("--label-column", default="label", help="column of the class labels")
    p.add_argument("--image-shape", type=_parse_shape, help="C,H,W of flat feature rows")
    p.add_argument("--output", help="output folder")
    p.add_argument("--model", choices=MODEL_KINDS, default="mlp",
                   help="network trained on the data (convnet needs --image-shape)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic examples per class")
    p.add_argument("--iterations", type=int, default=300, help="distillation steps")
    p.add_argument("--syn-steps", type=int, default=20, help="student steps N")
    p.add_argument("--expert-epochs", type=int, default=2, help="expert epochs matched M")
    p.add_argument("--max-start-epoch", type=int, default=10, help="T+")
    p.add_argument("--lr-images", type=float, default=10.0,
                   help="learning rate of the synthetic examples")
    p.add_argument("--lr-lr", type=float, default=1e-5,
                   help="learning rate of the learned student learning rate")
    p.add_argument("--lr-init", type=float, default=0.01,
                   help="initial student learning rate")
    p.add_argument("--batch-syn", type=int, default=None,
                   help="synthetic examples per student step (default: all)")
    p.add_argument("--init", choices=("representative", "real", "noise"),
                   default="representative", help="initialization of the synthetic set")
    p.add_argument("--balanced-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="balanced inner-loop loss")
    p.add_argument("--intermediate-matching", action=argparse.BooleanOptionalAction, default=True,
                   help="match intermediate expert checkpoints too")
    p.add_argument("--weight-perturb", action=argparse.BooleanOptionalAction, default=True,
                   help="perturb the student start weights")
    p.add_argument("--perturb-mode", choices=["ast", "filter"], default="ast",
                   help="ast: the AST code's W + a (D/||D||_F) W on conv kernels only (an MLP is "
                        "not perturbed); filter: Li et al.'s filter-normalised noise")
    p.add_argument("--perturb-scale", type=float, default=None,
                   help="alpha of the perturbation (default 1 for ast, 0.01 for filter)")
    p.add_argument("--student-momentum", type=float, default=0.9, help="0 turns it off")
    p.add_argument("--experts", choices=("ast", "mtt"), default="ast", help="expert recipe")
    p.add_argument("--num-experts", type=int, default=5, help="expert trajectories to train")
    p.add_argument("--train-epochs", type=int, default=20, help="epochs per expert")
    p.add_argument("--expert-lr", type=float, default=0.01, help="learning rate of the experts")
    p.add_argument("--expert-batch-size", type=int, default=64, help="batch size of the experts")
    p.add_argument("--evaluate", action="store_true",
                   help="hold out 20%% and compare distilled / random real / full data")
    p.add_argument("--eval-seeds", type=int, default=5, help="fresh networks per evaluated set")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_check_and_run)


def _check_and_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    if not args.write_dataset and not args.output:
        raise CommandError("distill: --output is required (or --write-dataset with --dataset)")
    if args.write_dataset and not args.dataset:
        raise CommandError("distill: --write-dataset needs --dataset")
    if not args.write_dataset:
        try:  # every option is checked before any data is read
            _configs(args)
        except ValidationError as e:
            raise config_error("distill", e) from None
    return _cli(args)
