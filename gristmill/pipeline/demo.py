"""The demo corpus: built from the Python standard library, so any machine has it.

Three domains, written as JSONL shards (zstd, gzip and plain):

- ``docstrings``: module, class and function docstrings of the stdlib sources;
- ``code``: top-level functions and classes of the stdlib sources;
- ``topics``: the help topics in ``pydoc_data.topics``.

Real corpora have duplicates and broken records, so the demo has them too:
the stdlib repeats many docstrings (exact and near duplicates), and one file of
deliberately broken lines plus a truncated ``.gz`` exercise the rejects path.
"""

from __future__ import annotations

import ast
import gzip
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import zstandard

DOMAINS = ("docstrings", "code", "topics")


def _stdlib_files(limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts and "idlelib" not in p.parts)
    return files[:limit]


def _iter_stdlib(limit_files: int) -> Iterator[tuple[str, str, str]]:
    """(domain, id, text) from the stdlib sources."""
    for path in _stdlib_files(limit_files):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        rel = path.name if path.parent.name == "lib" else f"{path.parent.name}/{path.name}"
        doc = ast.get_docstring(tree)
        if doc:
            yield "docstrings", f"{rel}::__module__", doc
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                d = ast.get_docstring(node)
                if d:
                    yield "docstrings", f"{rel}::{node.name}", d
                end = getattr(node, "end_lineno", None) or node.lineno
                body = "\n".join(lines[node.lineno - 1:end])
                if 200 <= len(body) <= 20_000:
                    yield "code", f"{rel}::{node.name}::code", body


def _iter_topics() -> Iterator[tuple[str, str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield "topics", f"topic::{name}", topics[name]


def build_demo_corpus(folder: Path, limit_files: int = 2000, shards_per_domain: int = 3) -> Path:
    """Write the demo corpus into ``folder`` (idempotent: skipped when present)."""
    folder = Path(folder)
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    by_domain: dict[str, list[dict]] = {d: [] for d in DOMAINS}
    for dom, rid, text in list(_iter_stdlib(limit_files)) + list(_iter_topics()):
        by_domain[dom].append({"id": rid, "text": text, "domain": dom})
    for dom, recs in by_domain.items():
        for k in range(shards_per_domain):
            part = recs[k::shards_per_domain]
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode()
            if k == 0:
                (folder / f"{dom}-{k:02d}.jsonl.zst").write_bytes(
                    zstandard.ZstdCompressor(level=3).compress(body))
            elif k == 1:
                (folder / f"{dom}-{k:02d}.jsonl.gz").write_bytes(gzip.compress(body))
            else:
                (folder / f"{dom}-{k:02d}.jsonl").write_bytes(body)
    broken = [
        b'{"id": "broken-1", "text": "a record whose JSON never closes"',
        b'{"id": "broken-2", "text": 42}',
        b'{"id": "broken-3"}',
        b'{"id": "broken-4", "text": "invalid UTF-8 \xff\xfe here"}',
        b'["not", "an", "object"]',
    ]
    (folder / "broken.jsonl").write_bytes(b"\n".join(broken) + b"\n")
    good = "".join(json.dumps({"id": f"trunc-{i}", "text": f"record {i} " * 30}) + "\n"
                   for i in range(5000)).encode()
    (folder / "truncated.jsonl.gz").write_bytes(gzip.compress(good)[:-200])
    done.write_text("ok\n")
    return folder
