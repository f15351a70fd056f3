"""Real multilingual text: paragraphs of the Debian Reference in eight languages.

``apt-get install debian-reference-{de,en,es,fr,it,ja,pt,zh-cn}`` puts the
plain-text manual of each language in ``/usr/share/debian-reference/``. A
translation leaves some paragraphs in English (untranslated sections, command
listings); a paragraph of a translation that also occurs in the English
manual is left out, so the language label of what remains is the
translation's language. Tables (lines with ``|``) and paragraphs with fewer
than ``min_chars`` characters are left out too.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

ROOT = Path("/usr/share/debian-reference")
LANGUAGES = ("de", "en", "es", "fr", "it", "ja", "pt", "zh-cn")
PACKAGES = " ".join(f"debian-reference-{lang}" for lang in LANGUAGES)


def _paragraphs(lang: str) -> list[str]:
    path = ROOT / f"debian-reference.{lang}.txt.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: apt-get install {PACKAGES}")
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    out = []
    for block in re.split(r"\n\s*\n", text):
        if "|" in block or "+---" in block:
            continue
        out.append(" ".join(block.split()))
    return out


def debian_paragraphs(min_chars: int = 100) -> list[tuple[str, str]]:
    """``(language, paragraph)`` pairs, in file order, language by language."""
    english = set(_paragraphs("en"))
    pairs = []
    for lang in LANGUAGES:
        for p in _paragraphs(lang):
            if len(p) >= min_chars and (lang == "en" or p not in english):
                pairs.append((lang, p))
    return pairs
