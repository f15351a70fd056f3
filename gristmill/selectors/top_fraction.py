"""Keep the highest-scored records until a fraction of all characters (or rows).

A global two-phase stage. This is how PreSelect and DCLM turn a classifier
score into a selection: sort by score, descending, and keep documents until
their cumulative characters reach ``fraction`` of the corpus's characters.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.hashing import record_hash
from gristmill.pipeline.stage import GlobalStage, StageOutput, StageParams, split_batch


class TopFractionParams(StageParams):
    column: str = Field(description="score column; higher is better unless order is 'min'")
    fraction: float = Field(gt=0, le=1, description="fraction of characters (or rows) to keep")
    by: Literal["chars", "rows"] = "chars"
    order: Literal["max", "min"] = "max"


class TopFraction(GlobalStage):
    """Keep the top ``fraction`` of the corpus by ``column``, measured in characters.

    With records sorted by score (descending; ties broken by a hash of the
    seed and id, so the cut is deterministic on any engine), record ``k`` is
    the first whose cumulative characters ``sum_{j<=k} c_j`` reach
    ``fraction * sum_j c_j``; records up to and including ``k`` are kept.
    A missing or NaN score ranks last.

    The summary holds (score, characters, tie-break hash) per record: 24 bytes
    per record, exact. ``artifacts`` publishes the threshold.
    """

    type_name = "top_fraction"
    Params: ClassVar = TopFractionParams

    def input_columns(self) -> tuple[str, ...]:
        return (self.params.column,) + (("text",) if self.params.by == "chars" else ())

    def _keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        score = batch.column(self.params.column).cast(pa.float64())
        s = pc.fill_null(score, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)
        if self.params.order == "min":
            s = -s
        s = np.where(np.isnan(s), -np.inf, s)
        if self.params.by == "chars":
            w = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            w = np.ones(batch.num_rows, dtype=np.int64)
        tie = record_hash(batch, self.seed, self.name)
        return s, w, tie

    def summarize(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._keys(batch)

    def merge(self, a, b):
        return tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))

    def finalize(self, summary) -> dict[str, Any]:
        if summary is None:
            return {"score": np.inf, "tie": 0, "kept_weight": 0, "total_weight": 0}
        s, w, tie = summary
        # descending score, then ascending tie hash
        order = np.lexsort((tie, -s))
        cum = np.cumsum(w[order])
        total = int(cum[-1]) if cum.size else 0
        k = int(np.searchsorted(cum, self.params.fraction * total, side="left"))
        k = min(k, len(order) - 1)
        i = order[k]
        return {"score": float(s[i]), "tie": int(tie[i]), "kept_weight": int(cum[k]),
                "total_weight": total, "kept_rows": k + 1, "rows": int(len(order))}

    def apply(self, batch: pa.Table, state: dict[str, Any]) -> StageOutput:
        s, _, tie = self._keys(batch)
        keep = (s > state["score"]) | ((s == state["score"]) & (tie <= np.uint64(state["tie"])))
        sign = -1 if self.params.order == "min" else 1
        return split_batch(batch, keep, self.name, "below_threshold",
                           np.array([f"threshold={sign * state['score']:.6g}"] * batch.num_rows,
                                    dtype=object))

    def artifacts(self, state: dict[str, Any]) -> dict[str, bytes]:
        out = dict(state)
        out["threshold"] = (-1 if self.params.order == "min" else 1) * out.pop("score")
        out["column"], out["fraction"], out["by"] = (self.params.column, self.params.fraction,
                                                     self.params.by)
        return {"threshold.json": json.dumps(out, indent=2).encode()}
