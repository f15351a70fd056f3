"""``gristmill examples [NAME]``: write the example recipes and build their inputs offline
(``gristmill.pipeline.examples``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gristmill.pipeline.examples import (
    EXAMPLES,
    EXTRAS_NEEDED,
    NEXT,
    build_examples,
    example_built,
)


def _cli(args: argparse.Namespace) -> int:
    from gristmill import recipes
    from gristmill.extras import require

    names = list(EXAMPLES) if args.example == "all" else [args.example]
    for name in names:  # before anything is built
        for extra in EXTRAS_NEEDED[name]:
            require(extra, f"gristmill examples {name}")
    if any("torch" in EXTRAS_NEEDED[n] for n in names):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file save/load bars of the tiny models
    root = Path(args.root)
    for name in names:
        t0 = time.time()
        before = example_built(name, root)
        paths = build_examples([name], root)[name]
        print(f"{name}: " + ("already built" if before else f"built in {time.time() - t0:.1f} s"))
        for p in paths:
            print(f"  {p}")
        installed = recipes.install(NEXT[name], root)
        for i in installed:
            if i.status == "edited":
                print(f"  kept your {i.path} (it differs from the shipped recipe)")
        print("  next: " + " && ".join(f"gristmill run {i.path}" for i in installed))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``gristmill examples``."""
    p = sub.add_parser("examples", help="write the example recipes and build their inputs "
                       "(offline)",
                       description="Copy the example recipes to OUT/recipes/ (an existing copy "
                       "is kept) and build, offline and idempotently, the data and tiny models "
                       "they read under OUT/data/. See docs/examples.md.")
    p.add_argument("example", nargs="?", default="all", choices=[*EXAMPLES, "all"],
                   help="which example (default: all)")
    p.add_argument("--out", "--root", dest="root", default=".",
                   help="working folder for recipes/, data/ and out/ (default: the current one)")
    p.set_defaults(func=_cli)
