"""The ``gristmill`` command line.

Core commands (run, check, inspect, demo) live here; other areas add theirs
by listing a module in ``COMMAND_MODULES``. Each such module defines
``add_parser(subparsers)``, which registers a subparser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: list[str] = [
    "gristmill.pipeline.commands",
    "gristmill.trainers.sft",
    "gristmill.trainers.distill_cli",
    "gristmill.trainers.preselect_cli",
    "gristmill.trainers.lm_cli",
    "gristmill.pipeline.examples",
    "gristmill.pipeline.real_corpus_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gristmill",
        description="Data selection and curation for LLM pretraining and fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
