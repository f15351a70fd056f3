"""FineWeb's line-level quality rules (row-local selector).

Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for the Finest
Text Data at Scale", Section 3.3 (custom filters), as implemented in
DataTrove's ``FineWebQualityFilter``, whose definitions, order and reason
names this follows. Over the non-blank lines of a document (split at ``\\n``):

- ``line_punct_ratio``: the fraction of lines ending in a sentence-terminal
  character is below ``line_punct_thr`` (0.12);
- ``short_line_ratio``: the fraction of lines of at most
  ``short_line_length`` (30) characters is above ``short_line_thr`` (0.67);
- ``char_dup_ratio``: characters of lines equal to an earlier line, over the
  characters of the text without newlines, is above ``char_duplicates_ratio``
  (0.01);
- ``list_ratio``: newlines per word is above ``new_line_ratio`` (0.3).

A document with no non-blank line is dropped as ``empty``. Words are
``text_units.split_words``; DataTrove counts spaCy tokens, which include
punctuation, so its ``list_ratio`` is lower on punctuated text. A document
without words is dropped as ``empty`` too (DataTrove divides by zero there).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch
from gristmill.selectors.filters.text_units import (
    find_duplicates,
    split_words,
    terminal_punctuation,
)


class FineWebLinesParams(StageParams):
    line_punct_thr: float = Field(0.12, ge=0, le=1, description="smallest fraction of lines "
                                  "ending in sentence-terminal punctuation")
    line_punct_exclude_zero: bool = Field(False, description="keep documents where no line "
                                          "ends in punctuation (the rule then only drops "
                                          "documents with some, but too few)")
    stop_chars: list[str] | None = Field(None, description="line endings that count as "
                                         "punctuation; default: Unicode Sentence_Terminal")
    short_line_thr: float = Field(0.67, ge=0, le=1, description="largest fraction of short lines")
    short_line_length: int = Field(30, ge=0, description="a line of at most this many "
                                   "characters is short")
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1, description="largest fraction of "
                                         "characters in duplicate lines")
    new_line_ratio: float = Field(0.3, ge=0, description="largest number of newlines per word")


def fineweb_reason(text: str, p: FineWebLinesParams, stops: tuple[str, ...]) -> tuple[str, float] | None:
    """The first rule ``text`` fails and its measured value, or None."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty", 0.0
    ratio = sum(line.endswith(stops) for line in lines) / len(lines)
    if ratio < p.line_punct_thr and not (ratio == 0 and p.line_punct_exclude_zero):
        return "line_punct_ratio", ratio
    ratio = sum(len(line) <= p.short_line_length for line in lines) / len(lines)
    if ratio > p.short_line_thr:
        return "short_line_ratio", ratio
    ratio = find_duplicates(lines)[1] / len(text.replace("\n", ""))
    if ratio > p.char_duplicates_ratio:
        return "char_dup_ratio", ratio
    words = split_words(text)
    if not words:
        return "empty", 0.0
    ratio = text.count("\n") / len(words)
    if ratio > p.new_line_ratio:
        return "list_ratio", ratio
    return None


class FineWebLines(RowStage):
    """FineWeb's line rules (Penedo et al. 2024, Sec. 3.3): reasons
    ``line_punct_ratio``, ``short_line_ratio``, ``char_dup_ratio``, ``list_ratio``,
    ``empty``; the detail is the measured value.

    Parameters
    ----------
    line_punct_thr : float
        Smallest fraction of lines that end in punctuation (0.12).
    line_punct_exclude_zero : bool
        Do not apply ``line_punct_thr`` to documents where no line ends in punctuation.
    stop_chars : list of str or None
        Line endings that count as punctuation (default: Unicode ``Sentence_Terminal``).
    short_line_thr, short_line_length : float, int
        Largest fraction (0.67) of lines of at most ``short_line_length`` (30) characters.
    char_duplicates_ratio : float
        Largest fraction of characters in lines that repeat an earlier line (0.01).
    new_line_ratio : float
        Largest number of newlines per word (0.3).

    Examples
    --------
    >>> import pyarrow as pa
    >>> menu = "\\n".join(["Home", "News", "Shop", "Contact us", "Grain prices today."])
    >>> out = FineWebLines().process(pa.table({"id": ["a"], "text": [menu]}))
    >>> out.dropped.column("reason").to_pylist()
    ['short_line_ratio']
    """

    type_name = "fineweb_lines"
    Params: ClassVar = FineWebLinesParams
    requires = ("text",)

    def process(self, batch: pa.Table) -> StageOutput:
        stops = tuple(self.params.stop_chars or terminal_punctuation())
        texts = batch.column("text").to_pylist()
        keep = np.ones(len(texts), dtype=bool)
        reasons = np.empty(len(texts), dtype=object)
        details = np.empty(len(texts), dtype=object)
        for i, text in enumerate(texts):
            failed = fineweb_reason(text, self.params, stops)
            if failed is not None:
                keep[i] = False
                reasons[i] = failed[0]
                details[i] = f"{failed[0]}={failed[1]:.4f}"
        return split_batch(batch, keep, self.name, reasons, details)
