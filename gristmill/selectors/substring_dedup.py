"""Exact substring dedup with a suffix array (Lee et al. 2022, "ExactSubstr").

Lee, Ippolito, Nystrom, Zhang, Eck, Callison-Burch & Carlini, "Deduplicating
Training Data Makes Language Models Better", ACL 2022, section 4.2: every
substring of at least ``k`` tokens that occurs more than once in the corpus
is found with a suffix array of the whole corpus and struck from the text.

Tokens here are words (split at the whitespace pyarrow splits at), each
mapped to a 32-bit hash; the corpus is the records' token sequences in row-key
order. With the suffix array ``SA`` and ``LCP[i] = lcp(SA[i], SA[i+1])``
(Kasai et al. 2001), the suffixes that start with one ``k``-gram are a run of
consecutive ``SA`` entries with ``LCP >= k``; an occurrence counts when its
``k`` tokens lie inside one record (its distance to the record's end is at
least ``k``: no separator tokens are needed). A ``k``-gram with two or more
counted occurrences is *repeated*, and a token is removed when it lies in the
window ``[p, p + k)`` of a removed occurrence ``p``. The union of the repeated
``k``-gram windows is exactly the union of the repeated substrings of length
``>= k``, which is what the paper's ``collect`` step outputs as byte ranges.

``keep: none`` removes every occurrence, as the paper and its code do
("completely striking them from the dataset"). ``keep: first`` (the default)
keeps the first occurrence of each repeated ``k``-gram (smallest row key,
then position) and removes the others, so one copy of a repeated passage
stays in the corpus. Where this code deviates from the paper's: words, not
GPT-2 BPE tokens (no tokenizer needed; ``min_tokens: 50`` words is about 65
BPE tokens of English); a record's text is cut at word starts, so the
whitespace before a removed span stays.

The stage is global: ``summarize`` collects each batch's token hashes,
``merge`` concatenates (order does not matter: ``finalize`` sorts records by
row key), ``finalize`` builds the suffix array with ``pydivsufsort`` (a
maintained binding of libdivsufsort; the ``substring`` extra) and keeps only
the removed ranges of the records that lose text, and ``apply`` cuts them out.
Memory at ``finalize``: the whole corpus's words on one machine, as in the
paper: the tokens, suffix array and LCP (4 bytes per word each) and a few
work arrays of 1-8 bytes per word; the peak is measured in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.stage import (
    ROW_KEY,
    GlobalStage,
    StageOutput,
    keep_all,
)
from gristmill.selectors.minhash import _ascii_word_table, _hash_tokens, _unicode_spaces
from gristmill.selectors.unit_dedup import RemainderParams, keep_what_remains


class SubstringDedupParams(RemainderParams):
    min_tokens: int = Field(50, ge=2, le=100_000, description="shortest repeated substring "
                            "removed, in words (Lee et al. use 50 BPE tokens)")
    keep: Literal["first", "none"] = Field("first", description="first: keep the first "
                                           "occurrence of each repeat; none: remove all, "
                                           "as the paper does")


@dataclass
class Removal:
    """The finalized state: for each record that loses text, its removed token ranges."""

    keys: np.ndarray  # uint64 row keys, sorted
    tokens: np.ndarray  # tokens per record (a check against apply's own split)
    starts: np.ndarray  # ranges, grouped by record in ``keys`` order
    ends: np.ndarray
    bounds: np.ndarray  # ranges of record i: bounds[i]:bounds[i + 1]
    corpus_tokens: int = 0


def word_pattern() -> re.Pattern[str]:
    """A regex of the words pyarrow's ``utf8_split_whitespace`` gives."""
    table = _ascii_word_table(True)
    spaces = [c for c in range(128) if table[c] == -1] + [int(c) for c in _unicode_spaces()]
    cls = "".join(f"\\U{c:08x}" for c in spaces)
    return re.compile(f"[^{cls}]+")


def repeated_windows(tokens: np.ndarray, record_end: np.ndarray, k: int,
                     keep: str) -> np.ndarray:
    """Boolean mask of the tokens to remove (module doc).

    ``tokens`` is the corpus (uint32), ``record_end[p]`` the end (exclusive)
    of the record holding position ``p``.
    """
    from pydivsufsort import divsufsort, kasai

    n = tokens.size
    remove = np.zeros(n, dtype=bool)
    if n <= k:
        return remove
    # int32 positions while they fit: the arrays here are the stage's memory peak
    idx = np.int32 if n < 2**31 - 1 else np.int64
    sa = divsufsort(tokens)
    link = kasai(tokens, sa)[:-1] >= k  # SA[i] and SA[i + 1] share their first k tokens
    # only SA entries in runs of two or more can be repeats: work on those alone
    multi = np.zeros(n, dtype=bool)
    multi[:-1] = link
    multi[1:] |= link
    at = np.flatnonzero(multi)
    pos = sa[at].astype(idx, copy=False)
    del sa, multi
    # a new run starts where an entry is not linked to the entry before it
    start = np.ones(at.size, dtype=bool)
    start[1:] = ~link[at[1:] - 1]
    del link, at
    run = np.cumsum(start, dtype=idx)
    run -= 1
    valid = (record_end[pos] - pos) >= k  # the k-gram at pos lies inside one record
    counted = np.bincount(run[valid], minlength=int(run[-1]) + 1 if run.size else 0)
    take = valid & (counted[run] >= 2)
    del counted, valid
    if keep == "first":
        # the first occurrence (smallest position) of each repeated k-gram stays
        first = np.full(int(run[-1]) + 1 if run.size else 0, n, dtype=idx)
        np.minimum.at(first, run[take], pos[take])
        take &= pos != first[run]
    p = pos[take]
    if p.size:
        diff = np.zeros(n + 1, dtype=idx)
        np.add.at(diff, p, 1)
        np.add.at(diff, p + k, -1)
        remove = np.cumsum(diff[:n], dtype=idx) > 0
    return remove


class SubstringDedup(GlobalStage):
    """``substring_dedup``: repeated substrings of ``min_tokens`` words or more removed.

    Records keep the rest of their text and are dropped, with reason
    ``mostly_repeated_substrings`` and detail ``removed_tokens=<n> remaining_chars=<c>``,
    when fewer than ``min_remaining_chars`` characters or less than
    ``min_remaining_fraction`` of their text remain.

    Parameters
    ----------
    min_tokens : int
        Shortest repeated substring removed, in words.
    keep : str
        ``first`` keeps the first occurrence of every repeat, ``none`` removes
        all (Lee et al.).
    min_remaining_chars : int
        A record left with fewer characters is dropped.
    min_remaining_fraction : float
        A record left with less than this share of its characters is dropped.

    Examples
    --------
    >>> import pyarrow as pa
    >>> st = SubstringDedup({"min_tokens": 4})
    >>> batch = pa.table({"_key": pa.array([1, 2], pa.uint64()),
    ...                   "text": ["intro: the same four words here. end",
    ...                            "other: the same four words here. bye"]})
    >>> out = st.apply(batch, st.finalize(st.summarize(batch)))
    >>> out.kept.column("text").to_pylist()
    ['intro: the same four words here. end', 'other: bye']
    """

    type_name = "substring_dedup"
    Params: ClassVar = SubstringDedupParams
    extras: ClassVar[tuple[str, ...]] = ("substring",)
    reason: ClassVar[str] = "mostly_repeated_substrings"
    text_column: ClassVar[str] = "text"

    def input_columns(self) -> tuple[str, ...]:
        return (self.text_column,)

    def summarize(self, batch: pa.Table) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        text = pc.fill_null(batch.column(self.text_column), "")
        words = pc.utf8_split_whitespace(text)
        if isinstance(words, pa.ChunkedArray):
            words = words.combine_chunks()
        counts = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(words)
        # pyarrow gives an empty word for leading or trailing whitespace: not a word
        real = pc.utf8_length(flat).to_numpy(zero_copy_only=False) > 0
        rec = np.repeat(np.arange(batch.num_rows), counts)[real]
        counts = np.bincount(rec, minlength=batch.num_rows).astype(np.int64)
        tok = (_hash_tokens(flat)[real] >> np.uint64(32)).astype(np.uint32)
        keys = batch.column(ROW_KEY).to_numpy(zero_copy_only=False).astype(np.uint64)
        return [(keys, counts, tok)]

    def merge(self, a: list, b: list) -> list:
        return a + b

    def finalize(self, summary: list | None) -> Removal:
        empty = np.zeros(0, np.int64)
        if not summary:
            return Removal(np.zeros(0, np.uint64), empty, empty, empty, np.zeros(1, np.int64))
        keys = np.concatenate([s[0] for s in summary])
        counts = np.concatenate([s[1] for s in summary])
        if counts.sum() == 0:
            return Removal(np.zeros(0, np.uint64), empty, empty, empty, np.zeros(1, np.int64))
        tok = np.concatenate([s[2] for s in summary])
        # the corpus in row-key order, whatever order the batches were merged in
        if keys.size > 1 and not (keys[1:] > keys[:-1]).all():
            starts = np.r_[0, np.cumsum(counts)[:-1]]
            order = np.argsort(keys, kind="stable")
            keys, counts, starts = keys[order], counts[order], starts[order]
            gather = np.repeat(starts - np.r_[0, np.cumsum(counts)[:-1]], counts) + \
                np.arange(counts.sum())
            tok = tok[gather]
            del gather
        corpus = np.ascontiguousarray(tok)
        del tok
        ends = np.cumsum(counts)
        record_end = np.repeat(ends.astype(np.int32 if ends[-1] < 2**31 - 1 else np.int64),
                               counts)
        remove = repeated_windows(corpus, record_end, self.params.min_tokens, self.params.keep)
        # removed ranges, relative to their record: a run of removed tokens also
        # breaks where a record ends (the next record's run is its own)
        rec_first = ends - counts
        boundary = np.zeros(corpus.size + 1, dtype=bool)
        boundary[rec_first] = True
        boundary[ends] = True
        prev = np.r_[False, remove[:-1]]
        nxt = np.r_[remove[1:], False]
        r_start = np.flatnonzero(remove & (~prev | boundary[:-1]))
        r_end = np.flatnonzero(remove & (~nxt | boundary[1:])) + 1
        rec_of = np.searchsorted(ends, r_start, side="right")
        s = r_start - rec_first[rec_of]
        e = r_end - rec_first[rec_of]
        recs, first = np.unique(rec_of, return_index=True)
        bounds = np.r_[first, rec_of.size].astype(np.int64)
        return Removal(keys[recs], counts[recs], s, e, bounds, int(corpus.size))

    def apply(self, batch: pa.Table, state: Removal) -> StageOutput:
        if batch.num_rows == 0 or state.keys.size == 0:
            return keep_all(batch)
        keys = batch.column(ROW_KEY).to_numpy(zero_copy_only=False).astype(np.uint64)
        at = np.searchsorted(state.keys, keys)
        at = np.minimum(at, state.keys.size - 1)
        hit = np.flatnonzero(state.keys[at] == keys)
        if hit.size == 0:
            return keep_all(batch)
        pattern = word_pattern()
        texts = batch.column(self.text_column).to_pylist()
        old_len = np.array([len(t or "") for t in texts], dtype=np.int64)
        new_len = old_len.copy()
        removed = np.zeros(batch.num_rows, dtype=np.int64)
        for row in hit:
            i = at[row]
            text = texts[row] or ""
            spans = [m.span() for m in pattern.finditer(text)]
            if len(spans) != state.tokens[i]:
                raise RuntimeError(f"{self.name}: record {int(keys[row])} has {len(spans)} "
                                   f"words now and {state.tokens[i]} when summarized")
            pieces, last = [], 0
            for s, e in zip(state.starts[state.bounds[i]: state.bounds[i + 1]],
                            state.ends[state.bounds[i]: state.bounds[i + 1]], strict=True):
                cut_from = spans[s][0]
                cut_to = spans[e][0] if e < len(spans) else len(text)
                pieces.append(text[last:cut_from])
                last = cut_to
                removed[row] += e - s
            pieces.append(text[last:])
            texts[row] = "".join(pieces)
            new_len[row] = len(texts[row])
        col = batch.schema.get_field_index(self.text_column)
        out = batch.set_column(col, batch.schema.field(self.text_column),
                               pa.array(texts, batch.schema.field(self.text_column).type))
        return keep_what_remains(out, removed, old_len, new_len, self.params, self.name,
                                 self.reason, "token")
