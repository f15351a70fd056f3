"""Gopher quality rules (row-local selector).

``GopherFilter`` is the subset of the Gopher quality rules of Rae et al. 2021,
"Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
Appendix A.1.1, with the paper's thresholds as defaults. A document is dropped
by the first rule it fails, and that rule's name is the drop reason; the
measured value goes into the detail.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch


class GopherParams(StageParams):
    min_words: int = Field(50, ge=0, description="word count lower bound")
    max_words: int = Field(100_000, ge=1, description="word count upper bound")
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="(# '#' + # '...') / words")
    max_ellipsis_line_fraction: float = Field(0.3, ge=0, le=1)
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1)
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1,
                                           description="words with an alphabetic character")

    @model_validator(mode="after")
    def _ranges(self) -> GopherParams:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError("min_mean_word_length must be <= max_mean_word_length")
        return self


def gopher_measures(text: str) -> tuple[int, float, float, float, float, float]:
    """(words, mean word length, symbol/word ratio, ellipsis-line fraction,
    duplicate-line fraction, alphabetic-word fraction) of one document."""
    words = text.split()
    n = len(words)
    if n == 0:
        return 0, 0.0, 0.0, 0.0, 0.0, 0.0
    mean_len = sum(len(w) for w in words) / n
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    n_lines = max(len(lines), 1)
    ellipsis = sum(ln.endswith(("...", "\u2026")) for ln in lines) / n_lines
    dup = (len(lines) - len(set(lines))) / n_lines
    alpha = sum(any(ch.isalpha() for ch in w) for w in words) / n
    return n, mean_len, symbols / n, ellipsis, dup, alpha


class GopherFilter(RowStage):
    """Gopher quality rules (Rae et al. 2021, App. A.1.1). Reasons, in the order
    checked: ``word_count``, ``mean_word_length``, ``symbol_word_ratio``,
    ``ellipsis_lines``, ``duplicate_lines``, ``alpha_words``.

    Examples
    --------
    >>> import pyarrow as pa
    >>> f = GopherFilter({"min_words": 3})
    >>> out = f.process(pa.table({"id": ["a", "b"], "text": ["one two three four", "hi"]}))
    >>> out.kept.column("id").to_pylist(), out.dropped.column("reason").to_pylist()
    (['a'], ['word_count'])
    """

    type_name = "gopher"
    Params: ClassVar = GopherParams
    requires = ("text",)

    def process(self, batch: pa.Table) -> StageOutput:
        p = self.params
        texts = batch.column("text").to_pylist()
        keep = np.ones(len(texts), dtype=bool)
        reasons = np.empty(len(texts), dtype=object)
        details = np.empty(len(texts), dtype=object)
        for i, t in enumerate(texts):
            n, mwl, sym, ell, dup, alpha = gopher_measures(t)
            rule = None
            if not p.min_words <= n <= p.max_words:
                rule, val = "word_count", n
            elif not p.min_mean_word_length <= mwl <= p.max_mean_word_length:
                rule, val = "mean_word_length", round(mwl, 3)
            elif sym > p.max_symbol_word_ratio:
                rule, val = "symbol_word_ratio", round(sym, 4)
            elif ell > p.max_ellipsis_line_fraction:
                rule, val = "ellipsis_lines", round(ell, 4)
            elif dup > p.max_duplicate_line_fraction:
                rule, val = "duplicate_lines", round(dup, 4)
            elif alpha < p.min_alpha_word_fraction:
                rule, val = "alpha_words", round(alpha, 4)
            if rule is not None:
                keep[i] = False
                reasons[i] = rule
                details[i] = f"{rule}={val}"
        return split_batch(batch, keep, self.name, reasons, details)
