"""Line and paragraph dedup: repeated units removed across the corpus.

A record's text is cut into *units* (``line_dedup``: lines, at ``\\n``;
``paragraph_dedup``: paragraphs, at blank lines). A unit occurring more than
``max_count`` times in the whole corpus (compared after stripping,
collapsing whitespace and lower-casing) keeps one occurrence, in its *first
holder*, the record with the smallest hash of (seed, row key), and is removed
from every other record. Units shorter than ``min_unit_chars`` are never
removed (a lone ``}`` or ``fi`` repeats by nature and carries structure). A
record keeps its other units, joined as they were (``\\n`` between lines;
paragraphs joined by one blank line), and is dropped, with reason
``mostly_repeated_lines`` / ``mostly_repeated_paragraphs``, when less than
``min_remaining_chars`` characters or ``min_remaining_fraction`` of its text
remain.

The anchors are Dolma's paragraph dedup (a Bloom filter of paragraphs seen
so far; a paragraph already in it is removed; Soldaini et al., "Dolma", 2024)
and DataTrove's sentence dedup (spans of sentences seen in an earlier
document removed). Both decide by arrival order, which differs between
engines and worker counts; here the stage is *global*: ``summarize`` adds
every unit to a counting Bloom filter (:mod:`gristmill.selectors.bloom`)
with its record's fingerprint, filters merge by a saturating sum and a
minimum (associative and commutative), and ``apply`` reads the merged filter,
so every engine keeps the same text. The filter is sized from
``expected_units`` (distinct units in the corpus) and ``fp_rate``; a unit
seen ``max_count`` times or fewer is wrongly removed only when all its cells
are over-counted and held by a smaller fingerprint, with probability at most
``fp_rate`` while the corpus has at most ``expected_units`` distinct units.
The artifact ``artifacts/<stage>/bloom.json`` reports the size, the fill, the
distinct units estimated from it and the false-positive rate they imply.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.hashing import mix64
from gristmill.pipeline.stage import (
    ROW_KEY,
    GlobalStage,
    StageOutput,
    StageParams,
    keep_all,
    split_batch,
)
from gristmill.selectors.bloom import CountingBloom, bloom_size
from gristmill.selectors.minhash import _hash_tokens


class RemainderParams(StageParams):
    """When a record that lost parts of its text is dropped (shared by the line,
    paragraph and substring dedup stages)."""

    min_remaining_chars: int = Field(1, ge=0, description="drop a record left with fewer "
                                     "characters than this")
    min_remaining_fraction: float = Field(0.0, ge=0, le=1, description="drop a record left "
                                          "with less than this fraction of its characters")


def keep_what_remains(out: pa.Table, removed: np.ndarray, old_len: np.ndarray,
                      new_len: np.ndarray, params: RemainderParams, stage: str, reason: str,
                      unit: str) -> StageOutput:
    """Split ``out`` (texts already shortened): a record that lost something is dropped
    when fewer than ``min_remaining_chars`` characters, or less than
    ``min_remaining_fraction`` of its characters, remain. Every row's detail says how
    many ``unit``s were removed and how many characters remain."""
    too_little = (removed > 0) & ((new_len < params.min_remaining_chars)
                                  | (new_len < params.min_remaining_fraction * old_len))
    details = np.array([f"removed_{unit}s={n} remaining_chars={c}"
                        for n, c in zip(removed, new_len, strict=True)], dtype=object)
    return split_batch(out, ~too_little, stage, reason, details)


class UnitDedupParams(RemainderParams):
    max_count: int = Field(1, ge=1, le=254, description="a unit seen more than this many "
                           "times keeps only its first holder's occurrence")
    min_unit_chars: int = Field(10, ge=1, description="units shorter than this (after "
                                "normalization) are never removed")
    expected_units: int = Field(1_000_000, ge=1, description="distinct units the Bloom "
                                "filter is sized for (5 bytes per cell, about 14 cells per "
                                "unit at fp_rate 0.001)")
    fp_rate: float = Field(0.001, gt=0, lt=0.5, description="false-positive rate of the "
                           "filter at expected_units")


class UnitDedup(GlobalStage):
    """Remove units seen more than ``max_count`` times (module doc).

    Parameters
    ----------
    max_count : int
        Occurrences (1 to 254) a unit may have before all but its first
        holder's are removed.
    min_unit_chars : int
        Shorter units are never removed.
    min_remaining_chars : int
        A record left with fewer characters is dropped.
    min_remaining_fraction : float
        A record left with less than this share of its characters is dropped.
    expected_units : int
        Distinct units the Bloom filter is sized for.
    fp_rate : float
        The filter's false-positive rate at ``expected_units``.
    """

    split_pattern: ClassVar[str] = "\n"
    joiner: ClassVar[str] = "\n"
    unit: ClassVar[str] = "unit"
    Params: ClassVar = UnitDedupParams
    text_column: ClassVar[str] = "text"

    def __init__(self, params: UnitDedupParams | dict | None = None, *,
                 name: str | None = None, seed: int = 0) -> None:
        super().__init__(params, name=name, seed=seed)
        self.m, self.k = bloom_size(self.params.expected_units, self.params.fp_rate)

    @property
    def reason(self) -> str:
        return f"mostly_repeated_{self.unit}s"

    def input_columns(self) -> tuple[str, ...]:
        return (self.text_column,)

    # -- units -----------------------------------------------------------------
    def units(self, batch: pa.Table) -> tuple[pa.ListArray, np.ndarray, np.ndarray, np.ndarray]:
        """(units per record, unit hashes, record index per unit, countable mask)."""
        text = pc.fill_null(batch.column(self.text_column), "")
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        lists = pc.split_pattern_regex(text, self.split_pattern)
        flat = pc.list_flatten(lists)
        norm = pc.utf8_lower(pc.utf8_trim_whitespace(
            pc.replace_substring_regex(flat, r"\s+", " ")))
        h = _hash_tokens(norm)
        counts = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        rec = np.repeat(np.arange(batch.num_rows), counts)
        countable = pc.utf8_length(norm).to_numpy(zero_copy_only=False) >= \
            self.params.min_unit_chars
        return lists, h, rec, countable

    def holders(self, batch: pa.Table) -> np.ndarray:
        """32-bit fingerprint of each record: hash of (seed, row key)."""
        keys = batch.column(ROW_KEY).to_numpy(zero_copy_only=False).astype(np.uint64)
        return (mix64(keys, seed=self.seed, salt=self.name) >> np.uint64(32)).astype(np.uint32)

    # -- global ----------------------------------------------------------------
    def summarize(self, batch: pa.Table) -> CountingBloom:
        _, h, rec, countable = self.units(batch)
        fp = self.holders(batch)
        return CountingBloom.of(h[countable], fp[rec[countable]], self.m, self.k)

    def merge(self, a: CountingBloom, b: CountingBloom) -> CountingBloom:
        return a.merge(b)

    def finalize(self, summary: CountingBloom | None) -> CountingBloom:
        if summary is None:
            return CountingBloom.of(np.zeros(0, np.uint64), np.zeros(0, np.uint32), self.m,
                                    self.k).dense()
        return summary.dense()

    def artifacts(self, state: CountingBloom) -> dict[str, bytes]:
        report = {"unit": self.unit, "max_count": self.params.max_count,
                  **state.report(self.params.expected_units, self.params.fp_rate)}
        return {"bloom.json": json.dumps(report, indent=1).encode()}

    def apply(self, batch: pa.Table, state: CountingBloom) -> StageOutput:
        if batch.num_rows == 0:
            return keep_all(batch)
        lists, h, rec, countable = self.units(batch)
        fp = self.holders(batch)
        count, first = state.query(h)
        repeated = countable & (count > self.params.max_count)
        # the first holder keeps the first occurrence in its text; every other goes
        pos = np.arange(h.size)
        order = np.lexsort((pos, h, rec))
        dup_in_record = np.zeros(h.size, bool)
        same = (h[order][1:] == h[order][:-1]) & (rec[order][1:] == rec[order][:-1])
        dup_in_record[order[1:][same]] = True
        remove = repeated & ((fp[rec] != first) | dup_in_record)
        if not remove.any():
            return keep_all(batch)
        flat = pc.list_flatten(lists)
        keep_unit = ~remove
        kept_per_rec = np.bincount(rec[keep_unit], minlength=batch.num_rows)
        offsets = np.r_[0, np.cumsum(kept_per_rec)].astype(np.int32)
        kept_lists = pa.ListArray.from_arrays(pa.array(offsets),
                                              flat.filter(pa.array(keep_unit)))
        new_text = pc.binary_join(kept_lists, self.joiner)
        old_len = pc.utf8_length(pc.fill_null(batch.column(self.text_column), "")) \
            .to_numpy(zero_copy_only=False).astype(np.int64)
        new_len = pc.utf8_length(new_text).to_numpy(zero_copy_only=False).astype(np.int64)
        removed = np.bincount(rec[remove], minlength=batch.num_rows)
        changed = removed > 0
        text = batch.column(self.text_column)
        text = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
        merged = pc.if_else(pa.array(changed), new_text.cast(text.type), text)
        out = batch.set_column(batch.schema.get_field_index(self.text_column),
                               batch.schema.field(self.text_column), merged)
        return keep_what_remains(out, removed, old_len, new_len, self.params, self.name,
                                 self.reason, self.unit)


class LineDedup(UnitDedup):
    """``line_dedup``: lines seen more than ``max_count`` times (module doc).

    Examples
    --------
    >>> import pyarrow as pa
    >>> st = LineDedup({"expected_units": 1000})
    >>> batch = pa.table({"_key": pa.array([1, 2], pa.uint64()),
    ...                   "text": ["Copyright 2024 Example Corp\\nfirst page text here",
    ...                            "Copyright 2024 Example Corp\\nsecond page text here"]})
    >>> out = st.apply(batch, st.finalize(st.summarize(batch)))
    >>> sorted(out.kept.column("text").to_pylist())  # one copy stays, in its first holder
    ['Copyright 2024 Example Corp\\nsecond page text here', 'first page text here']
    """

    type_name = "line_dedup"
    unit = "line"
    split_pattern = "\n"
    joiner = "\n"


class ParagraphDedup(UnitDedup):
    """``paragraph_dedup``: paragraphs (text between blank lines) seen more than
    ``max_count`` times (module doc); kept paragraphs are joined by one blank line."""

    type_name = "paragraph_dedup"
    unit = "paragraph"
    split_pattern = r"\n(?:[ \t\r\f\v]*\n)+"
    joiner = "\n\n"

