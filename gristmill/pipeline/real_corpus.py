"""Real-text corpora from Debian's documentation packages, split by whole document.

Every machine that runs Debian can install these packages with ``apt-get``;
nothing is generated for the purpose and nothing is downloaded from a model
or data hub. Each *source* is one manual (or the package descriptions) in
one language:

- English: ``handbook`` (debian-handbook, HTML), ``reference``
  (debian-reference-en, HTML), ``perl`` (perl-doc, pod through
  ``pod2text``), ``postgres`` (postgresql-doc, HTML), ``git`` (git-doc,
  HTML) and ``pkgdesc``: the short and long description of every package
  in the APT lists (``Translation-en``; ``apt-get update -o
  Acquire::Languages=en`` fetches it where Docker images turn it off).
- Other languages: ``reference-{de,es,fr,it,ja,pt,zh-cn}``,
  ``handbook-{de,fr,es,it,ja,pt}`` (the handbook ships every translation),
  ``maint-guide-{es,fr,it,ja}``, ``developers-reference-{de,fr}``,
  ``aptitude-{es,fr,ja}``.

Markup is stripped with real parsers: lxml's HTML parser (scripts, styles
and navigation bars dropped; headings, paragraphs, list items, table cells
and ``pre`` blocks become text blocks) and ``pod2text`` for pod. Documents
are cut at natural boundaries: a new document starts at a heading once the
current one holds ``min_chars``; paragraphs are never split unless a single
one is longer than ``max_chars`` (then at the last whitespace before the
limit). The split into ``train``/``dev``/``test`` is by *source document*
(an HTML page, a pod file, a source package for descriptions, so
``libfoo1`` and ``libfoo-dev`` land together), from a hash, never by
windows of one document.

Outputs (``build_real_corpus``): ``corpus.parquet`` (``id``, ``text``,
``source``, ``lang``, ``doc``, ``title``, ``split``) and ``packages.parquet``
(``package``, ``source_package``, ``section``, ``short``, ``long``,
``split``), written atomically, with ``manifest.json`` last.

Example
-------
>>> paths = build_real_corpus("data/real", sources=["git", "pkgdesc"])  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.pipeline.hashing import uniform


@dataclass(frozen=True)
class DocSource:
    """One manual in one language: where its files are and which package provides them."""

    name: str
    package: str
    lang: str
    kind: str  # "html", "pod" or "pkgdesc"
    patterns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def _sources() -> dict[str, DocSource]:
    out = [
        DocSource("handbook", "debian-handbook", "en", "html",
                  ("/usr/share/doc/debian-handbook/html/en-US/*.html",)),
        DocSource("reference", "debian-reference-en", "en", "html",
                  ("/usr/share/debian-reference/*.en.html",)),
        DocSource("perl", "perl-doc", "en", "pod", ("/usr/share/perl/5.*/pod/*.pod",)),
        DocSource("postgres", "postgresql-doc", "en", "html",
                  ("/usr/share/doc/postgresql-doc-*/html/*.html",)),
        DocSource("git", "git-doc", "en", "html",
                  ("/usr/share/doc/git-doc/*.html", "/usr/share/doc/git-doc/*/*.html")),
        DocSource("pkgdesc", "apt (Translation-en)", "en", "pkgdesc"),
    ]
    for lang in ("de", "es", "fr", "it", "ja", "pt", "zh-cn"):
        out.append(DocSource(f"reference-{lang}", f"debian-reference-{lang}", lang, "html",
                             (f"/usr/share/debian-reference/*.{lang}.html",)))
    for lang, d in (("de", "de-DE"), ("fr", "fr-FR"), ("es", "es-ES"), ("it", "it-IT"),
                    ("ja", "ja-JP"), ("pt", "pt-BR")):
        out.append(DocSource(f"handbook-{lang}", "debian-handbook", lang, "html",
                             (f"/usr/share/doc/debian-handbook/html/{d}/*.html",)))
    for lang in ("es", "fr", "it", "ja"):
        out.append(DocSource(f"maint-guide-{lang}", f"maint-guide-{lang}", lang, "html",
                             (f"/usr/share/doc/maint-guide-{lang}/html/*.{lang}.html",)))
    for lang in ("de", "fr"):
        out.append(DocSource(f"developers-reference-{lang}", f"developers-reference-{lang}", lang,
                             "html", (f"/usr/share/developers-reference/{lang}/*.html",),
                             exclude=("search.html", "genindex.html", "developers-reference.html")))
    for lang in ("es", "fr", "ja"):
        out.append(DocSource(f"aptitude-{lang}", f"aptitude-doc-{lang}", lang, "html",
                             (f"/usr/share/doc/aptitude/html/{lang}/*.html",)))
    return {s.name: s for s in out}


SOURCES: dict[str, DocSource] = _sources()
ENGLISH = tuple(n for n, s in SOURCES.items() if s.lang == "en")
SPLITS = ("train", "dev", "test")
TRANSLATIONS = "/var/lib/apt/lists/*_Translation-en*"
# Bumped when the text a build writes changes, so an older build is redone.
FORMAT = 1


class MissingPackagesError(RuntimeError):
    """Documentation packages the corpus needs are not installed; the message says how."""


def source_files(source: DocSource) -> list[str]:
    """The files of ``source`` present on this machine, sorted."""
    if source.kind == "pkgdesc":
        return sorted(glob.glob(TRANSLATIONS))
    files = {f for p in source.patterns for f in glob.glob(p)}
    return sorted(f for f in files if Path(f).name not in source.exclude)


def check_installed(names: Sequence[str]) -> None:
    """Raise ``MissingPackagesError`` naming the ``apt-get`` command when a source is missing."""
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"sources: unknown {unknown}; valid: {', '.join(SOURCES)}")
    missing = sorted({SOURCES[n].package for n in names
                      if SOURCES[n].kind != "pkgdesc" and not source_files(SOURCES[n])})
    problems = []
    if missing:
        problems.append("apt-get update && apt-get install -y " + " ".join(missing))
    if "pkgdesc" in names and not source_files(SOURCES["pkgdesc"]):
        problems.append("apt-get update -o Acquire::Languages=en  # package descriptions "
                        "(Translation-en), which Docker images often turn off")
    if any(SOURCES[n].kind == "pod" for n in names) and shutil.which("pod2text") is None:
        problems.append("apt-get install -y perl  # pod2text")
    if problems:
        raise MissingPackagesError("the real-text corpus needs Debian documentation that is not "
                                   "installed; run (as root):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- markup -> blocks

_BLOCK = {"p", "div", "pre", "li", "dt", "dd", "td", "th", "tr", "blockquote", "table", "ul", "ol",
          "dl", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "caption",
          "figure", "figcaption", "body"}
_HEADING = {"h1", "h2", "h3", "h4", "h5", "h6"}
_DROP_CLASSES = ("navheader", "navfooter", "docnav", "toc", "sphinxsidebar", "related", "footer",
                 "headerlink")
_DROP_XPATH = " | ".join(
    ["//script", "//style", "//head", "//nav", "//noscript", "//comment()",
     "//*[@id='banner' or @id='footer' or @id='header' or @id='title']"]
    + [f"//*[contains(concat(' ', normalize-space(@class), ' '), ' {c} ')]" for c in _DROP_CLASSES])
_SPACE = re.compile(r"\s+")


def html_blocks(html: bytes) -> list[tuple[str, str]]:
    """Text blocks of an HTML page: ``("h", heading)``, ``("p", paragraph)`` or ``("pre", code)``.

    Parsed with lxml; scripts, styles, heads and navigation/TOC/footer
    elements are dropped. Whitespace is collapsed except inside ``pre``.

    Examples
    --------
    >>> html_blocks(b"<html><body><h1>Title</h1><p>Some <b>bold</b>\\n text.</p>"
    ...             b"<script>x()</script><pre>a\\n  b</pre></body></html>")
    [('h', 'Title'), ('p', 'Some bold text.'), ('pre', 'a\\n  b')]
    """
    import lxml.html

    if not html.strip():
        return []
    root = lxml.html.document_fromstring(html)
    for el in root.xpath(_DROP_XPATH):
        if el.getparent() is not None:
            el.drop_tree()
    blocks: list[tuple[str, str]] = []
    buf: list[str] = []

    def flush(kind: str) -> None:
        raw = "".join(buf)
        buf.clear()
        text = raw.strip("\n").rstrip() if kind == "pre" else _SPACE.sub(" ", raw).strip()
        if text:
            blocks.append((kind, text))

    def walk(el, in_pre: bool) -> None:
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        block = tag in _BLOCK
        pre = in_pre or tag == "pre"
        if block and not in_pre:
            flush("p")
        if el.text:
            buf.append(el.text)
        for child in el:
            walk(child, pre)
            if child.tail:
                buf.append(child.tail)
        if block and not in_pre:
            flush("h" if tag in _HEADING else "pre" if tag == "pre" else "p")

    walk(root, False)
    return blocks


def pod_blocks(path: str) -> list[tuple[str, str]]:
    """Text blocks of a pod file, rendered by ``pod2text``: unindented lines are headings."""
    out = subprocess.run(["pod2text", "--utf8", path], capture_output=True, check=False)
    text = out.stdout.decode("utf-8", "replace")
    blocks: list[tuple[str, str]] = []
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        lines = para.split("\n")
        # a heading is the unindented lines at the top; its text follows indented
        k = 0
        while k < len(lines) and not lines[k].startswith(" "):
            k += 1
        if k:
            blocks.append(("h", _SPACE.sub(" ", " ".join(lines[:k])).strip()))
        lines = lines[k:]
        if not lines:
            continue
        # body is indented 4 spaces; verbatim (code) 8 or more
        body = [ln[4:] if ln.startswith("    ") else ln.lstrip() for ln in lines]
        if all(ln.startswith("    ") or not ln.strip() for ln in body):
            blocks.append(("pre", "\n".join(body).rstrip()))
        else:
            blocks.append(("p", _SPACE.sub(" ", " ".join(body)).strip()))
    return blocks


def cut_documents(blocks: Sequence[tuple[str, str]], min_chars: int = 1000,
                  max_chars: int = 4000) -> list[tuple[str | None, str]]:
    """Cut a page's blocks into documents of about ``min_chars``..``max_chars`` characters.

    A document ends at a heading once it holds ``min_chars``, or before a
    block that would take it past ``max_chars``. A block longer than
    ``max_chars`` alone is cut at whitespace. A last piece shorter than
    ``min_chars`` joins the previous document when both fit in
    ``max_chars``; otherwise it is kept if it has ``min_chars // 2``.

    Returns
    -------
    list of (title, text)
        ``title`` is the first heading of the document (None when it has none).
    """
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    pieces: list[tuple[str, str]] = []
    for kind, text in blocks:
        while len(text) > max_chars:
            cut = text.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append((kind, text[:cut].rstrip()))
            text = text[cut:].lstrip()
        if text:
            pieces.append((kind, text))
    docs: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    size = 0
    for kind, text in pieces:
        if cur and ((kind == "h" and size >= min_chars) or size + len(text) + 2 > max_chars):
            docs.append(cur)
            cur, size = [], 0
        cur.append((kind, text))
        size += len(text) + 2
    if cur:
        if docs and size < min_chars and sum(len(t) + 2 for _, t in docs[-1]) + size <= max_chars:
            docs[-1].extend(cur)
        else:
            docs.append(cur)
    out = []
    for d in docs:
        text = "\n\n".join(t for _, t in d)
        if len(text) >= min_chars // 2:
            out.append((next((t for k, t in d if k == "h"), None), text))
    return out


# ---------------------------------------------------------------- package descriptions


def _cat_apt_list(path: str) -> str:
    """An APT list file, decompressed (lz4, gz or plain) by apt's own helper."""
    helper = "/usr/lib/apt/apt-helper"
    if Path(helper).exists():
        return subprocess.run([helper, "cat-file", path], capture_output=True, check=True
                              ).stdout.decode("utf-8", "replace")
    data = Path(path).read_bytes()
    return (gzip.decompress(data) if path.endswith(".gz") else data).decode("utf-8", "replace")


def parse_deb822(text: str) -> Iterator[dict[str, str]]:
    """Stanzas of a Debian control file (``Packages``, ``Translation-*``); continuation
    lines are joined with newlines, keeping their leading space."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.split("\n"):
            if line.startswith((" ", "\t")) and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description(raw: str) -> str:
    """Debian's long-description format to plain text: `` .`` is a blank line,
    lines starting with two spaces are verbatim, the rest are filled."""
    paras: list[str] = []
    cur: list[str] = []
    for line in raw.split("\n"):
        body = line[1:] if line.startswith(" ") else line
        if body.strip() == ".":
            if cur:
                paras.append(" ".join(cur))
            cur = []
        elif body.startswith(" "):
            cur.append("\n" + body.rstrip() if cur else body.rstrip())
        else:
            cur.append(body.strip())
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(p.replace(" \n", "\n").strip() for p in paras if p.strip())


def package_descriptions() -> list[dict[str, str]]:
    """Package, source package, section, short and long description of every package in
    the APT lists (one entry per package name; the first description wins)."""
    meta: dict[str, tuple[str, str]] = {}
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, check=True
                          ).stdout.decode("utf-8", "replace")
    for f in parse_deb822(dump):
        if "Package" in f and f["Package"] not in meta:
            source = f.get("Source", f["Package"]).split(" ")[0]
            meta[f["Package"]] = (source, f.get("Section", ""))
    out: dict[str, dict[str, str]] = {}
    for path in source_files(SOURCES["pkgdesc"]):
        for f in parse_deb822(_cat_apt_list(path)):
            name, desc = f.get("Package"), f.get("Description-en")
            if not name or not desc or name in out:
                continue
            short, _, rest = desc.partition("\n")
            source, section = meta.get(name, (name, ""))
            out[name] = {"package": name, "source_package": source, "section": section,
                         "short": short.strip(), "long": long_description(rest)}
    return [out[k] for k in sorted(out)]


def pkgdesc_text(p: dict[str, str]) -> str:
    """A package description as one document."""
    return f"Package: {p['package']}\nDescription: {p['short']}\n\n{p['long']}".rstrip()


# ---------------------------------------------------------------- build


def split_of(keys: Iterable[str], dev: float = 0.1, test: float = 0.1, seed: int = 0) -> list[str]:
    """``train``/``dev``/``test`` per source-document key, from a hash of (seed, key)."""
    u = uniform(list(keys), seed=seed, salt="real_corpus_split")
    return np.where(u < test, "test", np.where(u < test + dev, "dev", "train")).tolist()


def source_documents(source: DocSource, min_chars: int, max_chars: int,
                     max_files: int | None = None) -> Iterator[tuple[str, str | None, str]]:
    """``(source document, title, text)`` for every document of one manual."""
    files = source_files(source)[:max_files]
    for path in files:
        if source.kind == "pod":
            blocks = pod_blocks(path)
        else:
            blocks = html_blocks(Path(path).read_bytes())
        for title, text in cut_documents(blocks, min_chars, max_chars):
            yield path, title, text


def build_real_corpus(out: str | Path, sources: Sequence[str] | None = None, *,
                      min_chars: int = 1000, max_chars: int = 4000, dev: float = 0.1,
                      test: float = 0.1, seed: int = 0, max_files: int | None = None,
                      max_packages: int | None = None, progress: bool = False) -> dict[str, Path]:
    """Build ``corpus.parquet`` (and ``packages.parquet`` when ``pkgdesc`` is asked) under ``out``.

    Parameters
    ----------
    out : str or Path
        Output folder; an existing complete build (``manifest.json`` with the
        same parameters) is kept and its paths returned.
    sources : list of str, optional
        Names from ``SOURCES`` (default: all). Missing packages stop the
        build before anything is read, with the ``apt-get`` command.
    min_chars, max_chars : int
        Document size range (characters), see ``cut_documents``.
    dev, test : float
        Shares of source documents in the dev and test splits.
    seed : int
        Seeds the split hash.
    max_files : int, optional
        At most this many files per manual (a quick slice for smoke tests).
    max_packages : int, optional
        At most this many package descriptions (every k-th package by name).
    progress : bool
        Print one line per source.

    Returns
    -------
    dict
        ``corpus`` (and ``packages``) -> path.
    """
    names = list(sources or SOURCES)
    check_installed(names)
    out = Path(out)
    params = {"format": FORMAT, "sources": names, "min_chars": min_chars, "max_chars": max_chars, "dev": dev,
              "test": test, "seed": seed, "max_files": max_files, "max_packages": max_packages}
    manifest = out / "manifest.json"
    paths = {"corpus": out / "corpus.parquet"}
    if "pkgdesc" in names:
        paths["packages"] = out / "packages.parquet"
    if manifest.exists() and json.loads(manifest.read_text()).get("params") == params:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    rows: dict[str, list] = {k: [] for k in ("id", "text", "source", "lang", "doc", "title")}
    counts = {}
    for name in names:
        src = SOURCES[name]
        t0 = time.time()
        n0 = len(rows["id"])
        if src.kind == "pkgdesc":
            pkgs = package_descriptions()
            if max_packages is not None and len(pkgs) > max_packages:
                pkgs = pkgs[:: -(-len(pkgs) // max_packages)]
            pkg_split = split_of([_split_key(name, f"pkgdesc/{p['source_package']}") for p in pkgs],
                                 dev, test, seed)
            table = pa.Table.from_pylist([{**p, "split": s} for p, s in zip(pkgs, pkg_split,
                                                                             strict=True)])
            _write_parquet(table, paths["packages"])
            for p in pkgs:
                rows["id"].append(f"pkgdesc/{p['package']}")
                rows["text"].append(pkgdesc_text(p))
                rows["source"].append(name)
                rows["lang"].append("en")
                rows["doc"].append(f"pkgdesc/{p['source_package']}")
                rows["title"].append(p["package"])
        else:
            for k, (path, title, text) in enumerate(source_documents(src, min_chars, max_chars,
                                                                     max_files)):
                rows["id"].append(f"{name}/{k:06d}")
                rows["text"].append(text)
                rows["source"].append(name)
                rows["lang"].append(src.lang)
                rows["doc"].append(path)
                rows["title"].append(title)
        counts[name] = len(rows["id"]) - n0
        if progress:
            chars = sum(len(t) for t in rows["text"][n0:])
            print(f"{name}: {counts[name]} documents, {chars / 1e6:.1f}M chars, "
                  f"{time.time() - t0:.0f}s", flush=True)
    # the doc key includes the source so translations of one page split independently
    keys = [_split_key(s, d) for s, d in zip(rows["source"], rows["doc"], strict=True)]
    rows["split"] = split_of(keys, dev, test, seed)
    _write_parquet(pa.Table.from_pydict(rows), paths["corpus"])
    manifest.write_text(json.dumps({"params": params, "documents": counts}, indent=1))
    return paths


def _split_key(source: str, doc: str) -> str:
    return f"{source}|{doc}"


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
