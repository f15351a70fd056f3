"""``gristmill preselect probe|train|select``: PreSelect in three commands.

1. ``probe``: predictive strength of a sample under a family of models with
   known benchmark scores; keeps PreSelect's positives and negatives and
   writes them, labelled, as parquet shards (a run of the
   ``predictive_strength`` and ``preselect_label`` stages).
2. ``train``: a fastText classifier on the labelled shards; reports held-out
   AUC and writes ``MODEL.bin`` with ``MODEL.json``.
3. ``select``: scores a corpus with the classifier (``fasttext`` stage) and
   keeps the top fraction by characters (``top_fraction`` stage).

Each of ``probe`` and ``select`` builds a recipe and runs it with the local
engine; ``--print-recipe`` prints that recipe (YAML) instead, to keep, edit
and run with ``gristmill run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def parse_model_arg(value: str) -> dict[str, Any]:
    """``PATH=SCORE`` -> ``{"path": PATH, "score": SCORE}`` (split at the last ``=``)."""
    path, sep, score = value.rpartition("=")
    try:
        if not sep or not path:
            raise ValueError
        return {"path": _abs(path), "score": float(score)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--model expects PATH=SCORE (a model folder and its benchmark score), got {value!r}"
        ) from None


def _models(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = list(args.model or [])
    if args.models:
        data = yaml.safe_load(Path(args.models).read_text())
        entries = data.get("models", data) if isinstance(data, dict) else data
        base = Path(args.models).resolve().parent
        for m in entries:
            p = Path(m["path"]).expanduser()
            models.append({"path": str(p if p.is_absolute() else base / p), "score": float(m["score"])})
    return models


def _source(inputs: list[str]) -> dict[str, Any]:
    return {"path": [_abs(p) if not any(c in p for c in "*?[") else p for p in inputs]}


def probe_recipe(args: argparse.Namespace) -> dict[str, Any]:
    stages: list[dict[str, Any]] = []
    if args.sample < 1:
        stages.append({"stage": "sample", "fraction": args.sample})
    ps: dict[str, Any] = {"stage": "predictive_strength", "models": _models(args),
                          "batch_size": args.batch_size, "device": args.device}
    if args.max_length:
        ps["max_length"] = args.max_length
    if args.stride:
        ps["stride"] = args.stride
    stages += [ps, {"stage": "preselect_label"}]
    return {"name": "preselect_probe", "seed": args.seed, "sources": [_source(args.input)],
            "stages": stages, "output": {"path": _abs(args.out)},
            "engine": {"kind": "local", "workers": args.workers, "batch_size": args.batch_rows}}


def select_recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": "preselect_select", "seed": args.seed, "sources": [_source(args.input)],
            "stages": [{"stage": "fasttext", "name": args.name, "model": _abs(args.classifier),
                        "label": args.label},
                       {"stage": "top_fraction", "column": args.name, "fraction": args.fraction,
                        "by": "chars"}],
            "output": {"path": _abs(args.out), "write_dropped": args.write_dropped},
            "engine": {"kind": "local", "workers": args.workers, "batch_size": args.batch_rows}}


def _run_recipe(body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    from gristmill.pipeline.recipe import RecipeError, parse_recipe
    from gristmill.pipeline.runner import OutputLocked, run_recipe

    if args.print_recipe:
        print(yaml.safe_dump(body, sort_keys=False), end="")
        return None
    try:
        recipe = parse_recipe(body, base_dir=Path.cwd())
        return run_recipe(recipe, fresh=args.fresh, progress=not args.quiet,
                          report=not args.no_report)
    except (RecipeError, OutputLocked) as e:
        print(f"gristmill preselect: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _probe(args: argparse.Namespace) -> int:
    if not args.model and not args.models:
        print("gristmill preselect probe: give the model family with --model PATH=SCORE "
              "(at least twice) or --models FILE", file=sys.stderr)
        return 2
    manifest = _run_recipe(probe_recipe(args), args)
    if manifest is None:
        return 0
    labels = json.loads((Path(args.out) / "artifacts" / "preselect_label" / "labels.json").read_text())
    print(f"probe: {labels['documents']:,} documents scored; maximal strength "
          f"{labels['positive_strength']:.3f} ({labels['maximal']:,} documents); "
          f"{labels['per_class']:,} positives and {labels['per_class']:,} negatives in "
          f"{Path(args.out) / 'shards'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from gristmill.trainers.fasttext import FastTextTrainConfig, read_labelled, train_fasttext

    try:
        texts, labels, ids = read_labelled(args.labelled, text_column=args.text_column,
                                           label_column=args.label_column)
        cfg = FastTextTrainConfig(epoch=args.epoch, lr=args.lr, word_ngrams=args.word_ngrams,
                                  dim=args.dim, bucket=args.bucket, threads=args.threads,
                                  valid_fraction=args.valid_fraction, seed=args.seed)
        res = train_fasttext(texts, labels, args.out, ids=ids, config=cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"gristmill preselect train: {e}", file=sys.stderr)
        return 2
    auc = "n/a" if res.auc is None else f"{res.auc:.4f}"
    print(f"train: {res.counts['train_positive']:,}+{res.counts['train_negative']:,} documents, "
          f"held-out AUC {auc}; model {res.model_path}, metadata {res.sidecar_path}")
    return 0


def _select(args: argparse.Namespace) -> int:
    manifest = _run_recipe(select_recipe(args), args)
    if manifest is None:
        return 0
    c = manifest["counts"]
    print(f"select: read {c['read']:,}, kept {c['kept']:,} (top {args.fraction:g} of characters "
          f"by {args.name}) in {Path(args.out) / 'shards'}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("preselect", help="PreSelect: probe, train a fastText scorer, select",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="preselect_command", metavar="STEP", help="probe, train or select")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("input", nargs="+", help="JSONL/parquet files, folders or globs")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--workers", type=int, default=1, help="local engine worker processes")
        q.add_argument("--batch-rows", type=int, default=1024, help="records per engine batch")
        q.add_argument("--seed", type=int, default=0, help="recipe seed")
        q.add_argument("--fresh", action="store_true", help="replace an earlier output")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--no-report", action="store_true", help="skip report.html (plots)")
        q.add_argument("--print-recipe", action="store_true", help="print the recipe, run nothing")

    q = sub.add_parser("probe", help="predictive strength of a sample; labelled parquet")
    common(q)
    q.add_argument("--model", action="append", type=parse_model_arg, metavar="PATH=SCORE",
                   help="a model folder and its benchmark score (repeat, >= 2)")
    q.add_argument("--models", help="YAML list of {path, score} (paths relative to the file)")
    q.add_argument("--sample", type=float, default=1.0, help="fraction of the input to probe")
    q.add_argument("--max-length", type=int, default=None, help="likelihood window (tokens)")
    q.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride for texts longer than --max-length")
    q.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.set_defaults(func=_probe)

    q = sub.add_parser("train", help="fastText classifier on a probe's labelled shards")
    q.add_argument("labelled", help="a probe's output folder or a parquet file")
    q.add_argument("--out", required=True, help="model file (.bin); MODEL.json goes beside it")
    q.add_argument("--text-column", default="text", help="column with the text")
    q.add_argument("--label-column", default="preselect_label", help="column with the 0/1 label")
    q.add_argument("--epoch", type=int, default=3, help="fastText epochs")
    q.add_argument("--lr", type=float, default=0.1, help="fastText learning rate")
    q.add_argument("--word-ngrams", type=int, default=2, help="fastText word n-gram length")
    q.add_argument("--dim", type=int, default=100, help="fastText vector size")
    q.add_argument("--bucket", type=int, default=2_000_000, help="fastText hash buckets")
    q.add_argument("--threads", type=int, default=1, help="fastText threads")
    q.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share held out for the validation AUC")
    q.add_argument("--seed", type=int, default=0, help="seed of the split and of fastText")
    q.set_defaults(func=_train)

    q = sub.add_parser("select", help="score with a fastText classifier, keep the top fraction")
    common(q)
    q.add_argument("--classifier", required=True, help="fastText model file")
    q.add_argument("--label", default="__label__1", help="positive label of the classifier")
    q.add_argument("--fraction", type=float, default=0.1, help="fraction of characters to keep")
    q.add_argument("--name", default="preselect", help="score column name")
    q.add_argument("--write-dropped", action="store_true",
                   help="write id, stage and reason of every drop")
    q.set_defaults(func=_select)
