"""``gristmill cache``: list and prune the model cache.

::

    gristmill cache list
    gristmill cache prune --older-than 30d
    gristmill cache prune --max-size 10GB --dry-run

The cache is ``$GRISTMILL_CACHE/models`` (default ``~/.cache/gristmill/models``;
``--cache-dir`` names another): one folder per version of a remote model,
tokenizer or list a stage loaded (``gristmill.pipeline.model_cache``). Pruning
is safe while runs use the cache: an entry being downloaded or looked up is
skipped, one used within ``--grace`` is kept, and a removed entry is fetched
again by the next run that needs it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from gristmill.cli.errors import CommandError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``"30d"`` -> seconds (``s``, ``m``, ``h``, ``d``, ``w``; a bare number is seconds).

    >>> parse_duration("30d"), parse_duration("90m"), parse_duration("15")
    (2592000.0, 5400.0, 15.0)
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; use a number with s, m, h, d or w "
                         f"(30d, 12h)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _size(text: str) -> int:
    from gristmill.pipeline.recipe import parse_size

    return parse_size(text)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _ago(seconds: float) -> str:
    for unit, width in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= width:
            return f"{seconds / width:.1f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _root(args: argparse.Namespace) -> Path:
    from gristmill.pipeline.model_cache import cache_root

    return Path(args.cache_dir) / "models" if args.cache_dir else cache_root()


def _entry_json(e, now: float) -> dict:
    return {"key": e.key, "url": e.url, "path": str(e.path), "bytes": e.bytes, "files": e.files,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.last_used)),
            "idle_seconds": round(now - e.last_used, 1)}


def run_list(args: argparse.Namespace) -> int:
    from gristmill.pipeline.model_cache import cache_entries

    root, now = _root(args), time.time()
    entries = cache_entries(root)
    if args.json:
        print(json.dumps({"cache": str(root), "bytes": sum(e.bytes for e in entries),
                          "entries": [_entry_json(e, now) for e in entries]}, indent=1))
        return 0
    print(f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{_human(sum(e.bytes for e in entries))}")
    for e in reversed(entries):  # most recently used first
        print(f"  {e.key[:12]}  {_human(e.bytes):>10}  {e.files:>4} file(s)  "
              f"used {_ago(now - e.last_used):<12}  {e.url}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from gristmill.pipeline.model_cache import prune

    try:
        max_size = _size(args.max_size) if args.max_size is not None else None
        older = parse_duration(args.older_than) if args.older_than is not None else None
        grace = parse_duration(args.grace)
    except ValueError as e:
        raise CommandError(f"cache prune: {e}") from None
    if max_size is None and older is None:
        raise CommandError("cache prune: give --max-size and/or --older-than (nothing to do)")
    root = _root(args)
    res = prune(max_size, older, grace=grace, dry_run=args.dry_run, root=root)
    verb = "would remove" if args.dry_run else "removed"
    for e in res.removed:
        print(f"  {verb} {e.key[:12]}  {_human(e.bytes):>10}  {e.url}")
    for e in res.kept_in_use:
        print(f"  kept {e.key[:12]} (in use, or used within --grace {args.grace})  {e.url}")
    left = sum(e.bytes for e in res.kept + res.kept_in_use)
    extra = f", {res.leftovers} unfinished download(s) cleared" if res.leftovers else ""
    print(f"{root}: {verb} {len(res.removed)} entr{'y' if len(res.removed) == 1 else 'ies'} "
          f"({_human(sum(e.bytes for e in res.removed))}); "
          f"{len(res.kept) + len(res.kept_in_use)} left ({_human(left)}){extra}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cache", help="list or prune the model cache",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", help="list or prune")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--cache-dir", default=None, help="the cache's base folder (default "
                       "$GRISTMILL_CACHE, else ~/.cache/gristmill); entries are in <it>/models")

    q = sub.add_parser("list", help="entries with their size and last use, most recent first")
    common(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_list)

    q = sub.add_parser("prune", help="remove entries unused for a while, or beyond a size")
    common(q)
    q.add_argument("--max-size", default=None, metavar="SIZE",
                   help="remove the least recently used entries until the cache holds at most "
                        "this (10GB, 500MB)")
    q.add_argument("--older-than", default=None, metavar="AGE",
                   help="remove entries whose last use is older than this (30d, 12h)")
    q.add_argument("--grace", default="1h", metavar="AGE",
                   help="never remove an entry used within this (a run may be loading it); "
                        "default 1h")
    q.add_argument("--dry-run", action="store_true", help="say what would be removed, remove "
                   "nothing")
    q.set_defaults(func=run_prune)
