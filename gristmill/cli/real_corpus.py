"""``gristmill real-corpus``: build the real-text corpus from Debian's documentation packages.

Argument parsing and printing only; the builder is
``gristmill.pipeline.real_corpus.build_real_corpus``.
"""

from __future__ import annotations

import argparse
import sys
import time


def _cli(args: argparse.Namespace) -> int:
    from gristmill.pipeline.real_corpus import (
        ENGLISH,
        SOURCES,
        MissingPackagesError,
        build_real_corpus,
    )

    names = list(SOURCES) if args.sources == ["all"] else \
        list(ENGLISH) if args.sources == ["english"] else args.sources
    t0 = time.time()
    try:
        paths = build_real_corpus(args.out, names, min_chars=args.min_chars,
                                  max_chars=args.max_chars, dev=args.dev, test=args.test,
                                  seed=args.seed, max_files=args.max_files,
                                  max_packages=args.max_packages, progress=True)
    except MissingPackagesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built in {time.time() - t0:.0f} s")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``gristmill real-corpus``."""
    p = sub.add_parser(
        "real-corpus", help="build a real-text corpus from Debian documentation packages",
        description="Strip the markup of Debian's documentation packages (HTML with lxml, pod "
        "with pod2text) and the APT package descriptions, cut documents at section boundaries "
        "and split train/dev/test by whole source document. Missing packages stop the build "
        "with the apt-get command that installs them.")
    p.add_argument("out", help="output folder (corpus.parquet, packages.parquet, manifest.json)")
    p.add_argument("--sources", nargs="+", default=["all"],
                   help="source names, 'english' or 'all' (default)")
    p.add_argument("--min-chars", type=int, default=1000,
                   help="a new document starts at a heading once this many characters are in")
    p.add_argument("--max-chars", type=int, default=4000,
                   help="a longer paragraph is cut at the last whitespace before this")
    p.add_argument("--dev", type=float, default=0.1, help="share of source documents in dev")
    p.add_argument("--test", type=float, default=0.1, help="share of source documents in test")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/dev/test split hash")
    p.add_argument("--max-files", type=int, default=None, help="files per manual (quick slice)")
    p.add_argument("--max-packages", type=int, default=None, help="package descriptions kept")
    p.set_defaults(func=_cli)
