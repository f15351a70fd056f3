"""Real multilingual documents from Debian's documentation packages (for the benchmarks).

A small loader used by ``mixture_validation.py`` and ``ot_validation.py``
until the package's own real-text corpus builder (issue 12) is in place. It
reads the HTML that ``apt-get install`` puts under ``/usr/share``:

    apt-get install -y debian-reference-{en,de,fr,es,it,ja,pt} \
        maint-guide maint-guide-{de,fr,es,it,ru} \
        developers-reference developers-reference-{de,fr,it,ja,ru} \
        aptitude-doc-{en,fr,es,cs,fi,nl,ru} debian-handbook

A *document* is one section of one page: the text between two headings
(``h1``-``h3``), with scripts, styles and navigation left out, whitespace
collapsed, and sections under ``MIN_CHARS`` characters dropped. Splits are
made by whole document, never inside one.
"""

from __future__ import annotations

import glob
import os
import re
from html.parser import HTMLParser

import numpy as np

MIN_CHARS = 200
DOC = "/usr/share/doc"

# Corpus (English documentation set) -> language -> glob of its HTML pages.
CORPORA: dict[str, dict[str, str]] = {
    "debian-reference": {
        lang: f"/usr/share/debian-reference/*.{lang}.html"
        for lang in ("en", "de", "fr", "es", "it", "ja", "pt", "zh-cn")},
    "maint-guide": {"en": f"{DOC}/maint-guide/html/*.en.html",
                    **{lang: f"{DOC}/maint-guide-{lang}/html/*.{lang}.html"
                       for lang in ("de", "fr", "es", "it", "ja", "ru")}},
    "developers-reference": {"en": f"{DOC}/developers-reference/docs/*.html",
                             **{lang: f"{DOC}/developers-reference-{lang}/docs/*.html"
                                for lang in ("de", "fr", "it", "ja", "ru")}},
    "aptitude": {lang: f"{DOC}/aptitude/html/{lang}/*.html"
                 for lang in ("en", "fr", "es", "cs", "fi", "nl", "ja", "ru")},
    "debian-handbook": {lang.split("-")[0]: f"{DOC}/debian-handbook/html/{lang}/*.html"
                        for lang in ("en-US", "de-DE", "fr-FR", "es-ES", "it-IT", "ja-JP",
                                     "pt-BR", "ru-RU", "nl-NL", "pl-PL")},
}

_SKIP = {"script", "style", "head", "nav", "title"}
_BREAK = {"h1", "h2", "h3"}


class _Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag in _BREAK:
            self.sections.append([])

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.sections[-1].append(data)


def html_sections(path: str) -> list[str]:
    """The sections of one HTML page, as plain text."""
    with open(path, encoding="utf-8", errors="replace") as f:
        parser = _Sections()
        parser.feed(f.read())
    out = []
    for parts in parser.sections:
        text = re.sub(r"\s+", " ", "".join(parts)).strip()
        if len(text) >= MIN_CHARS:
            out.append(text)
    return out


def corpus_pages(corpus: str, lang: str) -> list[list[str]]:
    """The sections of every page of ``corpus`` in ``lang``, page by page."""
    pattern = CORPORA[corpus].get(lang)
    if pattern is None:
        return []
    pages = []
    for path in sorted(glob.glob(pattern)):
        if os.path.basename(path).startswith("index") and corpus == "debian-handbook":
            continue
        sections = html_sections(path)
        if sections:
            pages.append(sections)
    return pages


def corpus_documents(corpus: str, lang: str) -> list[str]:
    """Every section of ``corpus`` in ``lang`` (empty when the package is not installed)."""
    return [doc for page in corpus_pages(corpus, lang) for doc in page]


def language_documents(lang: str, corpora: list[str] | None = None) -> list[str]:
    """All sections in ``lang`` over ``corpora`` (default: every corpus), deduplicated."""
    seen: set[str] = set()
    out = []
    for corpus in corpora or list(CORPORA):
        for doc in corpus_documents(corpus, lang):
            if doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def take_bytes(docs: list[str], budget: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Whole documents in random order until ``budget`` UTF-8 bytes; returns (taken, rest)."""
    order = rng.permutation(len(docs))
    taken, used, k = [], 0, 0
    while k < len(order) and used < budget:
        doc = docs[order[k]]
        taken.append(doc)
        used += len(doc.encode("utf-8"))
        k += 1
    return taken, [docs[i] for i in order[k:]]


def require(docs: dict[str, list[str]], need: dict[str, int]) -> None:
    """Stop with the apt-get line when a language has fewer bytes than needed."""
    short = {k: (sum(len(d.encode()) for d in docs.get(k, [])), n) for k, n in need.items()
             if sum(len(d.encode()) for d in docs.get(k, [])) < n}
    if short:
        raise SystemExit(f"not enough text for {short} (have, need) bytes; install the Debian "
                         f"documentation packages listed in {__file__}")
