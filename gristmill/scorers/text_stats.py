"""Cheap per-document statistics as score columns (vectorized with Arrow)."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, keep_all


class TextStats(RowStage):
    """Adds ``<name>_chars``, ``<name>_words``, ``<name>_alpha_fraction`` (letters
    over characters) and ``<name>_mean_word_length``."""

    type_name = "text_stats"
    Params: ClassVar = StageParams
    requires = ("text",)

    def output_columns(self) -> tuple[str, ...]:
        return tuple(f"{self.name}_{c}" for c in
                     ("chars", "words", "alpha_fraction", "mean_word_length"))

    def process(self, batch: pa.Table) -> StageOutput:
        text = batch.column("text")
        chars = pc.utf8_length(text)
        words = pc.list_value_length(pc.utf8_split_whitespace(text))
        letters = pc.count_substring_regex(text, pattern=r"\pL")
        nonspace = pc.subtract(chars, pc.count_substring_regex(text, pattern=r"\s"))
        denom = pc.max_element_wise(chars, 1)
        alpha = pc.divide(pc.cast(letters, pa.float64()), pc.cast(denom, pa.float64()))
        mwl = pc.divide(pc.cast(nonspace, pa.float64()),
                        pc.cast(pc.max_element_wise(words, 1), pa.float64()))
        for col, arr in zip(self.output_columns(), (chars, words, alpha, mwl), strict=True):
            batch = batch.append_column(col, arr)
        return keep_all(batch)
