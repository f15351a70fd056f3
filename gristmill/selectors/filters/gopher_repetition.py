"""Gopher repetition rules (row-local selector).

Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
Training Gopher", Appendix A.1.1 and Table A1. With ``L`` the document's
length in characters:

- duplicate paragraph fraction: paragraphs (split at two or more newlines)
  equal to an earlier paragraph, over all paragraphs (> 0.30 drops);
- duplicate paragraph character fraction: their characters over ``L`` (> 0.20);
- duplicate line fraction and duplicate line character fraction, the same
  over lines (split at one or more newlines) (> 0.30, > 0.20);
- top n-gram character fraction, n = 2, 3, 4: characters of the most frequent
  word n-gram (n words joined by spaces) times its count, over ``L``
  (> 0.20, 0.18, 0.16);
- duplicate n-gram character fraction, n = 5..10: scanning the words, an
  n-gram seen before adds its characters (words concatenated) and the scan
  jumps n words, otherwise it moves one word; the sum over ``L``
  (> 0.15, 0.14, 0.13, 0.12, 0.11, 0.10).

The definitions and the order of the checks follow DataTrove's
``GopherRepetitionFilter`` (``datatrove/pipeline/filters/
gopher_repetition_filter.py``), so the same document gets the same reason; the
reasons are DataTrove's names. Words are ``text_units.split_words``, where
DataTrove uses spaCy's tokenizer (see that module for where they differ).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch
from gristmill.selectors.filters.text_units import find_duplicates, split_words

_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")

Fraction = float | None


class GopherRepetitionParams(StageParams):
    dup_para_frac: Fraction = Field(0.3, ge=0, le=1, description="duplicate paragraphs over "
                                    "paragraphs; null turns the rule off")
    dup_para_char_frac: Fraction = Field(0.2, ge=0, le=1, description="characters of duplicate "
                                         "paragraphs over the document's characters")
    dup_line_frac: Fraction = Field(0.3, ge=0, le=1, description="duplicate lines over lines")
    dup_line_char_frac: Fraction = Field(0.2, ge=0, le=1, description="characters of duplicate "
                                         "lines over the document's characters")
    top_n_grams: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> largest allowed character fraction of the most frequent n-gram")
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> largest allowed character fraction of duplicated n-grams")

    @model_validator(mode="after")
    def _ngram_ranges(self) -> GopherRepetitionParams:
        for field in ("top_n_grams", "dup_n_grams"):
            for n, frac in getattr(self, field).items():
                if n < 1 or not 0 <= frac <= 1:
                    raise ValueError(f"{field}: n must be >= 1 and the fraction in [0, 1], "
                                     f"got {n}: {frac}")
        return self


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the most frequent n-gram (joined by spaces) times its count;
    ties go to the n-gram seen first."""
    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of repeated n-grams, each repeat skipping its n words.

    As in DataTrove, an n-gram is its words concatenated without a separator
    (so ``["ab", "c"]`` and ``["a", "bc"]`` are the same n-gram).
    """
    seen: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def repetition_reason(text: str, p: GopherRepetitionParams) -> tuple[str, float] | None:
    """The first rule ``text`` fails and its measured value, or None."""
    length = len(text)
    if length == 0:
        return None
    paragraphs = _PARAGRAPH.split(text.strip())
    n_dup, chars = find_duplicates(paragraphs)
    if p.dup_para_frac is not None and n_dup / len(paragraphs) > p.dup_para_frac:
        return "dup_para_frac", n_dup / len(paragraphs)
    if p.dup_para_char_frac is not None and chars / length > p.dup_para_char_frac:
        return "dup_para_char_frac", chars / length
    lines = _LINES.split(text)
    n_dup, chars = find_duplicates(lines)
    if p.dup_line_frac is not None and n_dup / len(lines) > p.dup_line_frac:
        return "dup_line_frac", n_dup / len(lines)
    if p.dup_line_char_frac is not None and chars / length > p.dup_line_char_frac:
        return "dup_line_char_frac", chars / length
    words = split_words(text)
    for n, limit in sorted(p.top_n_grams.items()):
        frac = top_ngram_chars(words, n) / length
        if frac > limit:
            return f"top_{n}_gram", frac
    for n, limit in sorted(p.dup_n_grams.items()):
        frac = duplicate_ngram_chars(words, n) / length
        if frac > limit:
            return f"duplicated_{n}_n_grams", frac
    return None


class GopherRepetition(RowStage):
    """Drop documents that repeat themselves (Gopher, Rae et al. 2021, Table A1).

    Reasons, in the order checked: ``dup_para_frac``, ``dup_para_char_frac``,
    ``dup_line_frac``, ``dup_line_char_frac``, ``top_{n}_gram``,
    ``duplicated_{n}_n_grams``; the detail is the measured fraction.

    Parameters
    ----------
    dup_para_frac, dup_para_char_frac, dup_line_frac, dup_line_char_frac : float or None
        Largest allowed fractions (the paper's 0.3, 0.2, 0.3, 0.2); None turns a rule off.
    top_n_grams : dict of int to float
        For each n, the largest allowed character fraction of the most frequent n-gram.
    dup_n_grams : dict of int to float
        For each n, the largest allowed character fraction of duplicated n-grams.

    Examples
    --------
    >>> import pyarrow as pa
    >>> stage = GopherRepetition()
    >>> spam = "\\n".join(["buy cheap grain now"] * 10)
    >>> out = stage.process(pa.table({"id": ["a"], "text": [spam]}))
    >>> out.dropped.column("reason").to_pylist()
    ['dup_line_frac']
    """

    type_name = "gopher_repetition"
    Params: ClassVar = GopherRepetitionParams
    requires = ("text",)

    def process(self, batch: pa.Table) -> StageOutput:
        texts = batch.column("text").to_pylist()
        keep = np.ones(len(texts), dtype=bool)
        reasons = np.empty(len(texts), dtype=object)
        details = np.empty(len(texts), dtype=object)
        for i, text in enumerate(texts):
            failed = repetition_reason(text, self.params)
            if failed is not None:
                keep[i] = False
                reasons[i] = failed[0]
                details[i] = f"{failed[0]}={failed[1]:.4f}"
        return split_batch(batch, keep, self.name, reasons, details)
