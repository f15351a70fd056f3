"""Filter records by their URL: domain block and allow lists, banned words
(row-local selector).

As in C4 (Raffel et al. 2020, Sec. 2.2) and RefinedWeb (Penedo et al. 2023,
"The RefinedWeb Dataset for Falcon LLM", Sec. 3.1 and App. G.1): a blocked
domain blocks all of its subdomains (``example.com`` blocks
``news.example.com``), a blocked URL blocks exactly that URL, and the URL's
words (split at anything that is not a letter or digit, lower-cased) are
checked against hard-banned words (one is enough), soft-banned words (at
least ``soft_word_threshold`` of them) and banned sub-words (a substring of
the URL with its separators removed, for words hidden in ``freegrainsex``).
Reasons, in the order checked: ``no_url``, ``not_allowed``,
``blocked_domain``, ``blocked_url``, ``banned_word``, ``soft_banned_words``,
``banned_subword``.

An allowed domain (``allow_domains``, with its subdomains) passes every rule;
with ``allow_only: true`` every other domain is dropped (``not_allowed``).
Lists come inline or from files (one entry per line, ``#`` comments), read
once per worker in ``setup``. Hosts are lower-cased, a ``www.`` prefix and a
port are ignored, and IDNA (``xn--``) hosts are compared as written.
"""

from __future__ import annotations

import re
from typing import ClassVar
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import Field

from gristmill.pipeline.model_cache import is_model_file
from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch
from gristmill.pipeline.storage import is_remote

_HOST = re.compile(r"^[\w-]+(?:\.[\w-]+)+$")
_NON_WORD = re.compile(r"[^0-9a-zA-Z\u00c0-\uffff]+")


class UrlFilterParams(StageParams):
    url_column: str = Field("url", description="column holding the URL")
    block_domains: list[str] = Field(default_factory=list, description="domains to drop, "
                                     "with their subdomains")
    block_domains_files: list[str] = Field(default_factory=list,
                                           description="files of domains to drop, one a line")
    block_urls: list[str] = Field(default_factory=list, description="exact URLs to drop")
    block_urls_files: list[str] = Field(default_factory=list, description="files of URLs to drop")
    allow_domains: list[str] = Field(default_factory=list, description="domains (with "
                                     "subdomains) that pass every rule")
    allow_domains_files: list[str] = Field(default_factory=list,
                                           description="files of allowed domains")
    allow_only: bool = Field(False, description="drop every domain not in the allow list")
    banned_words: list[str] = Field(default_factory=list, description="one in the URL's words drops")
    soft_banned_words: list[str] = Field(default_factory=list,
                                         description="soft_word_threshold of them drop")
    soft_word_threshold: int = Field(2, ge=1, description="soft-banned words in a URL that "
                                     "drop it")
    banned_subwords: list[str] = Field(default_factory=list, description="a substring of the "
                                       "URL without separators drops")
    missing_url: str = Field("drop", pattern="^(drop|keep)$", description="what to do with a "
                             "record without a URL (or with one that has no host): drop or keep")


def url_host(url: str) -> str | None:
    """Lower-cased host of ``url`` without ``www.`` and port; None if there is none."""
    url = url.strip()
    if "://" not in url:
        url = "//" + url
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".")
    if not _HOST.match(host):
        return None
    return host[4:] if host.startswith("www.") else host


def domain_suffixes(host: str) -> list[str]:
    """``a.b.example.com`` -> the host and every parent domain."""
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def _read_lines(path: str) -> list[str]:
    """Non-empty, non-comment lines of a local file (``Stage.local_path`` fetches a URL)."""
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


class UrlFilter(RowStage):
    """Drop records by URL (see the module docstring for the rules and reasons).

    Parameters
    ----------
    url_column : str
        The column with the URL (default ``url``; carry it with ``columns: [url]``).
    block_domains, block_domains_files : list of str
        Domains to drop with all their subdomains, inline and from files.
    block_urls, block_urls_files : list of str
        Exact URLs to drop.
    allow_domains, allow_domains_files : list of str
        Domains that pass every rule.
    allow_only : bool
        Drop every domain that is not allowed.
    banned_words, soft_banned_words, soft_word_threshold, banned_subwords
        Word rules over the URL (see the module docstring).
    missing_url : {"drop", "keep"}
        A record without a usable URL is dropped (``no_url``) or kept.

    Examples
    --------
    >>> import pyarrow as pa
    >>> f = UrlFilter({"block_domains": ["spam.example"], "banned_words": ["casino"]})
    >>> urls = ["https://news.spam.example/a", "http://mill.org/casino-night", "https://mill.org/"]
    >>> out = f.process(pa.table({"id": ["a", "b", "c"], "url": urls}))
    >>> out.kept.column("id").to_pylist(), out.dropped.column("reason").to_pylist()
    (['c'], ['blocked_domain', 'banned_word'])
    """

    type_name = "url_filter"
    path_fields = ("block_domains_files", "block_urls_files", "allow_domains_files")
    Params: ClassVar = UrlFilterParams

    def input_columns(self) -> tuple[str, ...]:
        return (self.params.url_column,)

    def check(self, base_dir: str) -> None:
        p = self.params
        for field in ("block_domains_files", "block_urls_files", "allow_domains_files"):
            for path in getattr(p, field):
                if not open_ok(self.resolve_path(path)):
                    raise ValueError(f"{field}: {path} is not a readable file "
                                     f"(resolved to {self.resolve_path(path)})")
        if p.allow_only and not (p.allow_domains or p.allow_domains_files):
            raise ValueError("allow_only: true needs allow_domains or allow_domains_files")

    def setup(self) -> None:
        p = self.params

        def gather(inline: list[str], files: list[str]) -> frozenset[str]:
            items = list(inline)
            for path in files:
                items += _read_lines(self.local_path(path))
            return frozenset(i.strip().lower().removeprefix("www.").rstrip(".") for i in items)

        self._block = gather(p.block_domains, p.block_domains_files)
        self._allow = gather(p.allow_domains, p.allow_domains_files)
        urls = list(p.block_urls)
        for path in p.block_urls_files:
            urls += _read_lines(self.local_path(path))
        self._urls = frozenset(u.strip() for u in urls)
        self._banned = frozenset(w.lower() for w in p.banned_words)
        self._soft = frozenset(w.lower() for w in p.soft_banned_words)
        self._sub = None
        if p.banned_subwords:
            self._sub = re.compile("|".join(re.escape(_NON_WORD.sub("", w.lower()))
                                            for w in p.banned_subwords))

    def reason(self, url: str | None) -> str | None:
        """The rule ``url`` fails, or None."""
        host = url_host(url) if url else None
        if host is None:
            return "no_url" if self.params.missing_url == "drop" else None
        parents = domain_suffixes(host)
        if any(d in self._allow for d in parents):
            return None
        if self.params.allow_only:
            return "not_allowed"
        if any(d in self._block for d in parents):
            return "blocked_domain"
        if url.strip() in self._urls:
            return "blocked_url"
        words = {w for w in _NON_WORD.split(url.lower()) if w}
        if words & self._banned:
            return "banned_word"
        if len(words & self._soft) >= self.params.soft_word_threshold:
            return "soft_banned_words"
        if self._sub is not None and self._sub.search(_NON_WORD.sub("", url.lower())):
            return "banned_subword"
        return None

    def process(self, batch: pa.Table) -> StageOutput:
        if not hasattr(self, "_block"):
            self.setup()
        urls = batch.column(self.params.url_column).to_pylist()
        reasons = np.array([self.reason(u) for u in urls], dtype=object)
        keep = np.array([r is None for r in reasons], dtype=bool)
        return split_batch(batch, keep, self.name, reasons)


def open_ok(path: str) -> bool:
    if is_remote(path):  # one metadata request; the file is fetched in setup()
        return is_model_file(path)
    try:
        with open(path, encoding="utf-8"):
            return True
    except OSError:
        return False
