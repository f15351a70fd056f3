"""Keep documents by character length (row-local selector)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch


class LengthParams(StageParams):
    min_chars: int = Field(0, ge=0)
    max_chars: int | None = Field(None, ge=1)


class LengthFilter(RowStage):
    """Keep documents with ``min_chars <= len(text) <= max_chars`` (reasons
    ``too_short`` / ``too_long``)."""

    type_name = "length_filter"
    Params: ClassVar = LengthParams
    requires = ("text",)

    def process(self, batch: pa.Table) -> StageOutput:
        n = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False)
        short = n < self.params.min_chars
        long = n > self.params.max_chars if self.params.max_chars is not None else np.zeros_like(short)
        reasons = np.where(short, "too_short", "too_long").astype(object)
        return split_batch(batch, ~(short | long), self.name, reasons)
