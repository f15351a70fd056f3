"""Keep a fraction of records by a hash of (seed, id): the same records on any
engine and any partitioning."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from gristmill.pipeline.hashing import record_uniform
from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch


class SampleParams(StageParams):
    fraction: float = Field(gt=0, le=1, description="expected fraction of records kept")


class Sample(RowStage):
    """Keep a record iff ``u(seed, stage name, id) < fraction`` (reason ``sampled_out``).

    Examples
    --------
    >>> import pyarrow as pa
    >>> s = Sample({"fraction": 0.5}, seed=1)
    >>> out = s.process(pa.table({"id": [str(i) for i in range(1000)]}))
    >>> 400 < out.kept.num_rows < 600
    True
    """

    type_name = "sample"
    Params: ClassVar = SampleParams

    def process(self, batch: pa.Table) -> StageOutput:
        u = record_uniform(batch, self.seed, self.name)
        return split_batch(batch, u < self.params.fraction, self.name, "sampled_out")
