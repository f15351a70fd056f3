"""Keep the highest-scored records until a fraction of all characters (or rows).

A global two-phase stage. This is how PreSelect and DCLM turn a classifier
score into a selection: sort by score, descending, and keep documents until
their cumulative characters reach ``fraction`` of the corpus's characters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, BinaryIO, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.hashing import record_hash
from gristmill.pipeline.stage import GlobalStage, StageOutput, StageParams, split_batch

#: a spilled record: the score as a key that sorts ascending in selection order
#: (``score_key``), the tie-break hash, the weight (characters or 1)
SPILL_DTYPE = np.dtype([("k", "<u8"), ("t", "<u8"), ("w", "<i8")])
#: records the k-way merge buffers at once (1.5 MB), split among the files ...
MERGE_RECORDS = 1 << 16
#: ... but at least this many per file (many files: 6 KB each)
MIN_CHUNK = 256
_SIGN = np.uint64(1 << 63)


def score_key(s: np.ndarray) -> np.ndarray:
    """uint64 keys that sort ascending as ``s`` sorts descending (``-0.0`` is ``0.0``)."""
    b = (np.asarray(s, dtype=np.float64) + 0.0).view(np.uint64)
    ordered = np.where(b & _SIGN, ~b, b | _SIGN)  # ascending with s
    return ~ordered


def key_score(k: np.ndarray) -> np.ndarray:
    """The inverse of ``score_key``."""
    ordered = ~np.asarray(k, dtype=np.uint64)
    b = np.where(ordered & _SIGN, ordered & ~_SIGN, ~ordered)
    return b.view(np.float64)


def spill_records(s: np.ndarray, w: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """``SPILL_DTYPE`` rows sorted in selection order (score descending, then tie
    hash ascending; stable, as the in-memory ``lexsort`` is)."""
    rec = np.empty(s.size, dtype=SPILL_DTYPE)
    rec["k"], rec["t"], rec["w"] = score_key(s), tie, w
    return rec[np.lexsort((rec["t"], rec["k"]))]


def _count_upto(rec: np.ndarray, k: np.uint64, t: np.uint64) -> int:
    """Rows of the sorted ``rec`` whose (k, t) is at most ``(k, t)``."""
    lo = int(np.searchsorted(rec["k"], k, "left"))
    hi = int(np.searchsorted(rec["k"], k, "right"))
    return lo + int(np.searchsorted(rec["t"][lo:hi], t, "right"))


def _read_records(f: BinaryIO, n: int) -> np.ndarray:
    want = n * SPILL_DTYPE.itemsize
    chunks, got = [], 0
    while got < want:
        b = f.read(want - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    if got % SPILL_DTYPE.itemsize:
        raise ValueError("a spilled top_fraction summary is truncated")
    return np.frombuffer(b"".join(chunks), dtype=SPILL_DTYPE)


def select_spilled(sources: list[Callable[[], BinaryIO]], fraction: float) -> dict[str, Any]:
    """The top-fraction cut of spilled, sorted record files, streaming.

    Totals come from the headers; then the files are merged in chunks: every
    file buffers its next ``max(MIN_CHUNK, MERGE_RECORDS / files)`` records,
    the records up to the smallest last key of the files that are not
    exhausted are merged (a stable sort, files in task order), their weights
    accumulated, and the first record whose cumulative weight reaches
    ``fraction * total`` is the cut (the last record if none does), as in
    ``TopFraction.finalize``.
    """
    with ExitStack() as stack:
        files = [stack.enter_context(open_()) for open_ in sources]
        heads = [np.frombuffer(f.read(16), dtype="<i8") for f in files]
        rows = int(sum(int(h[0]) for h in heads))
        total = int(sum(int(h[1]) for h in heads))
        if rows == 0:
            return {"score": np.inf, "tie": 0, "kept_weight": 0, "total_weight": 0}
        target = fraction * total
        chunk = max(MIN_CHUNK, MERGE_RECORDS // len(files))
        bufs = [np.empty(0, dtype=SPILL_DTYPE) for _ in files]
        left = [int(h[0]) for h in heads]  # rows not yet read, per file
        cum = seen = 0
        last = None
        while True:
            for i, f in enumerate(files):
                if bufs[i].size == 0 and left[i]:
                    bufs[i] = _read_records(f, min(chunk, left[i]))
                    left[i] -= bufs[i].size
                    if bufs[i].size == 0:
                        raise ValueError("a spilled top_fraction summary is truncated")
            live = [i for i in range(len(files)) if bufs[i].size]
            if not live:
                break
            open_ends = [(bufs[i]["k"][-1], bufs[i]["t"][-1]) for i in live if left[i]]
            parts = []
            for i in live:
                n = bufs[i].size if not open_ends else _count_upto(bufs[i], *min(open_ends))
                parts.append(bufs[i][:n])
                bufs[i] = bufs[i][n:]
            merged = np.concatenate(parts)
            merged = merged[np.lexsort((merged["t"], merged["k"]))]
            c = cum + np.cumsum(merged["w"])
            j = int(np.searchsorted(c, target, side="left"))
            if j < merged.size:
                return _cut(merged[j], int(c[j]), seen + j + 1, total, rows)
            cum, seen, last = int(c[-1]), seen + merged.size, merged[-1]
        return _cut(last, cum, seen, total, rows)


def _cut(rec: np.void, kept_weight: int, kept_rows: int, total: int, rows: int) -> dict[str, Any]:
    return {"score": float(key_score(np.array([rec["k"]], dtype=np.uint64))[0]),
            "tie": int(rec["t"]), "kept_weight": kept_weight, "total_weight": total,
            "kept_rows": kept_rows, "rows": rows}


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
    per record, exact. It is spilled (``spills``): each task writes its records
    sorted in selection order, and the threshold is found by a streaming
    k-way merge of those files (``select_spilled``) that holds a bounded
    number of records (``MERGE_RECORDS``, at least ``MIN_CHUNK`` per file)
    whatever the corpus size; the result is the in-memory selection's, bit for
    bit. ``artifacts`` publishes the threshold.

    Parameters
    ----------
    column : str
        Score column; higher is better unless ``order`` is ``"min"``.
    fraction : float
        Fraction of the characters (or rows) to keep, in (0, 1].
    by : str
        ``"chars"`` (text length in characters) or ``"rows"``.
    order : str
        ``"max"`` keeps the highest scores, ``"min"`` the lowest.
    """

    type_name = "top_fraction"
    Params: ClassVar = TopFractionParams
    spills = True

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

    def spill_summary(self, summary, sink: BinaryIO) -> None:
        """One task's records as ``SPILL_DTYPE`` rows in selection order, after a
        header (rows, total weight)."""
        rec = spill_records(*summary)
        sink.write(np.array([rec.size, int(rec["w"].sum())], dtype="<i8").tobytes())
        sink.write(rec.tobytes())

    def finalize_spilled(self, sources: list[Callable[[], BinaryIO]]) -> dict[str, Any]:
        return select_spilled(sources, self.params.fraction)

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
