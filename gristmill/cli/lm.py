"""``gristmill tokenize`` and ``gristmill train-lm``.

::

    gristmill tokenize --tokenizer runs/tok --out runs/tokens/train out/
    gristmill tokenize --tokenizer s3://models/tok --out s3://data/tokens/train s3://data/out
    gristmill train-lm lm.yaml --set max_steps=200 --set seed=1
    torchrun --nproc_per_node 8 -m gristmill.cli train-lm lm.yaml --set bf16=true
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gristmill.cli.errors import CommandError, config_error

SHARD_GLOBS = ("part-*.parquet", "part-*.jsonl")


def shard_files(paths: list[str]) -> list[Path]:
    """Expand run output folders (``<out>/shards/part-*``) and shard folders into files;
    local paths or URLs (``s3://bucket/out``), through ``gristmill.pipeline.storage``."""
    from gristmill.pipeline import storage

    files: list[Path] = []
    for p in map(storage.as_path, paths):
        if storage.is_dir(p):
            folder = p / "shards" if storage.is_dir(p / "shards") else p
            found = sorted((f for g in SHARD_GLOBS for f in storage.glob_files(folder / g)),
                           key=str)
            if not found:
                raise ValueError(f"shards: no part-*.parquet or part-*.jsonl in {folder}")
            files += found
        else:
            files.append(p)
    return files


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_train_config(path: str, overrides: list[str]):
    """An ``LMTrainConfig`` from a YAML or JSON file plus ``key=value`` overrides;
    ``CommandError`` (one line, naming the field) when it is not valid."""
    import yaml
    from pydantic import ValidationError

    from gristmill.trainers.lm import LMTrainConfig

    if not Path(path).is_file():
        raise CommandError(f"train-lm: no config file at {path}")
    try:
        fields = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise CommandError(f"train-lm: {path} is not valid YAML: "
                           f"{' '.join(str(e).split())}") from None
    if not isinstance(fields, dict):
        raise CommandError(f"train-lm: {path}: expected a mapping of LMTrainConfig fields")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"train-lm: --set expects key=value, got {item!r}")
        fields[key] = _parse_value(value)
    try:
        return LMTrainConfig(**fields)
    except ValidationError as e:
        raise config_error("train-lm", e, prefix=f"{path}: ") from None


def run_tokenize(args: argparse.Namespace) -> int:
    from gristmill.pipeline import storage
    from gristmill.pipeline.model_cache import is_model_folder, localize
    from gristmill.pipeline.tokenized import describe_tokenized, tokenize_shards

    if not is_model_folder(args.tokenizer):
        raise CommandError(f"tokenize: --tokenizer {args.tokenizer} is not a folder")
    try:
        files = shard_files(args.shards)
    except ValueError as e:
        raise CommandError(f"tokenize: {e}") from None
    missing = [str(f) for f in files if not storage.is_file(f)]
    if missing:
        raise CommandError(f"tokenize: no such shard file(s): {', '.join(missing)}")
    tokenize_shards(files, localize(args.tokenizer), args.out, text_column=args.text_column,
                    domain_column=args.domain_column or None, append_eos=not args.no_eos,
                    batch_size=args.batch_size, tokenizer_label=args.tokenizer)
    print(describe_tokenized(args.out))
    return 0


def run_train_lm(args: argparse.Namespace) -> int:
    from gristmill.trainers.lm import train_lm

    result = train_lm(load_train_config(args.config, args.set))
    print(json.dumps({"model": str(result.model_dir), "steps": result.steps, "tokens": result.tokens,
                      "final_eval": result.final_eval}, indent=1))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    tok = subparsers.add_parser("tokenize", help="tokenize output shards into Megatron .bin/.idx")
    tok.add_argument("shards", nargs="+", help="shard files, shard folders or run output folders "
                     "(local paths or URLs: s3://...)")
    tok.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder, or its URL "
                     "(s3://..., fetched into the model cache)")
    tok.add_argument("--out", required=True, help="output prefix (writes .bin, .idx, .dom.npy, "
                     ".domains.json); a URL (s3://...) gets them uploaded, .idx last")
    tok.add_argument("--text-column", default="text", help="column holding the text")
    tok.add_argument("--domain-column", default="domain", help="empty string to ignore domains")
    tok.add_argument("--no-eos", action="store_true", help="do not append eos to each document")
    tok.add_argument("--batch-size", type=int, default=1024, help="documents tokenized at a time")
    tok.set_defaults(func=run_tokenize)

    lm = subparsers.add_parser("train-lm", help="pretrain a causal LM on tokenized shards")
    lm.add_argument("config", help="YAML or JSON with LMTrainConfig fields")
    lm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field (value parsed as JSON when it can be)")
    lm.set_defaults(func=run_train_lm)
