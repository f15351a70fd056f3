"""Keep the highest-scored records until a fraction of all characters (or rows).

A global two-phase stage. This is how PreSelect and DCLM turn a classifier
score into a selection: sort by score, descending, and keep documents until
their cumulative characters reach ``fraction`` of the corpus's characters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, BinaryIO, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, ValidationInfo, field_validator

from gristmill.pipeline.hashing import record_hash
from gristmill.pipeline.stage import GlobalStage, StageOutput, StageParams, split_batch
from gristmill.selectors.quantile_sketch import WeightedKLL, capacity_for

#: a spilled record: the score as a key that sorts ascending in selection order
#: (``score_key``), the tie-break hash, the weight (characters or 1)
SPILL_DTYPE = np.dtype([("k", "<u8"), ("t", "<u8"), ("w", "<i8")])
#: records the k-way merge buffers at once (1.5 MB), split among the files
MERGE_RECORDS = 1 << 16
#: files merged at once; more are merged in passes (``merge_runs``), so at most
#: ``MERGE_RECORDS / FAN_IN`` (1,024) records are read from a file at a time
FAN_IN = 64
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


def _merged_chunks(files: list[BinaryIO], rows: list[int]) -> Iterator[np.ndarray]:
    """The records of sorted files (``rows`` each, headers read), merged, in sorted
    chunks: every file buffers its next ``max(1, MERGE_RECORDS / files)`` records,
    and the records up to the smallest last key of the files that are not
    exhausted are merged (a stable sort, files in the order given)."""
    chunk = max(1, MERGE_RECORDS // max(1, len(files)))
    bufs = [np.empty(0, dtype=SPILL_DTYPE) for _ in files]
    left = list(rows)  # rows not yet read, per file
    while True:
        for i, f in enumerate(files):
            if bufs[i].size == 0 and left[i]:
                bufs[i] = _read_records(f, min(chunk, left[i]))
                left[i] -= bufs[i].size
                if bufs[i].size == 0:
                    raise ValueError("a spilled top_fraction summary is truncated")
        live = [i for i in range(len(files)) if bufs[i].size]
        if not live:
            return
        open_ends = [(bufs[i]["k"][-1], bufs[i]["t"][-1]) for i in live if left[i]]
        parts = []
        for i in live:
            n = bufs[i].size if not open_ends else _count_upto(bufs[i], *min(open_ends))
            parts.append(bufs[i][:n])
            bufs[i] = bufs[i][n:]
        merged = np.concatenate(parts)
        yield merged[np.lexsort((merged["t"], merged["k"]))]


def _open_all(stack: ExitStack, sources: list[Callable[[], BinaryIO]]
              ) -> tuple[list[BinaryIO], list[int], list[int]]:
    files = [stack.enter_context(open_()) for open_ in sources]
    heads = [np.frombuffer(f.read(16), dtype="<i8") for f in files]
    return files, [int(h[0]) for h in heads], [int(h[1]) for h in heads]


def merge_runs(sources: list[Callable[[], BinaryIO]], scratch: str
               ) -> list[Callable[[], BinaryIO]]:
    """One pass of a multi-pass merge: every ``FAN_IN`` consecutive files merged
    into one sorted file (same format) in the folder ``scratch``; returns openers
    of the new files, in order. Equal records keep the files' order, so the
    final merge is the single-pass merge's, bit for bit."""
    out = []
    for g in range(0, len(sources), FAN_IN):
        path = os.path.join(scratch, f"run-{g // FAN_IN:06d}.spill")
        with ExitStack() as stack, open(path, "wb") as sink:
            files, rows, weights = _open_all(stack, sources[g:g + FAN_IN])
            sink.write(np.array([sum(rows), sum(weights)], dtype="<i8").tobytes())
            for merged in _merged_chunks(files, rows):
                sink.write(merged.tobytes())
        out.append(lambda p=path: open(p, "rb"))
    return out


def select_spilled(sources: list[Callable[[], BinaryIO]], fraction: float) -> dict[str, Any]:
    """The top-fraction cut of spilled, sorted record files, streaming.

    Totals come from the headers; then the files are merged in sorted chunks
    (``_merged_chunks``), their weights accumulated, and the first record whose
    cumulative weight reaches ``fraction * total`` is the cut (the last record
    if none does), as in ``TopFraction.finalize``. More than ``FAN_IN`` files
    are first merged ``FAN_IN`` at a time into sorted files in a temporary
    folder (``merge_runs``, as many passes as needed), so the merge buffers at
    most ``MERGE_RECORDS`` records whatever the number of files.
    """
    scratch: list[str] = []
    try:
        while len(sources) > FAN_IN:
            scratch.append(tempfile.mkdtemp(prefix="gristmill-top-fraction-"))
            sources = merge_runs(sources, scratch[-1])
            if len(scratch) > 1:  # the pass before is read; its files can go
                shutil.rmtree(scratch.pop(0), ignore_errors=True)
        with ExitStack() as stack:
            files, heads_rows, heads_weight = _open_all(stack, sources)
            rows, total = sum(heads_rows), sum(heads_weight)
            if rows == 0:
                return {"score": np.inf, "tie": 0, "kept_weight": 0, "total_weight": 0}
            target = fraction * total
            cum = seen = 0
            last = None
            for merged in _merged_chunks(files, heads_rows):
                c = cum + np.cumsum(merged["w"])
                j = int(np.searchsorted(c, target, side="left"))
                if j < merged.size:
                    return _cut(merged[j], int(c[j]), seen + j + 1, total, rows)
                cum, seen, last = int(c[-1]), seen + merged.size, merged[-1]
            return _cut(last, cum, seen, total, rows)
    finally:
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)


def _cut(rec: np.void, kept_weight: int, kept_rows: int, total: int, rows: int) -> dict[str, Any]:
    return {"score": float(key_score(np.array([rec["k"]], dtype=np.uint64))[0]),
            "tie": int(rec["t"]), "kept_weight": kept_weight, "total_weight": total,
            "kept_rows": kept_rows, "rows": rows}


class TopFractionParams(StageParams):
    column: str = Field(description="score column; higher is better unless order is 'min'")
    fraction: float = Field(gt=0, le=1, description="fraction of characters (or rows) to keep")
    by: Literal["chars", "rows"] = "chars"
    order: Literal["max", "min"] = "max"
    method: Literal["exact", "sketch"] = Field(
        "exact", description="'exact' (spilled, sorted records) or 'sketch' (a KLL sketch)")
    epsilon: float = Field(0.001, gt=0, le=0.5, description="sketch: rank error bound, a "
                           "fraction of the total weight")
    delta: float = Field(1e-6, gt=0, lt=1, description="sketch: probability that the bound fails")

    @field_validator("epsilon", "delta")
    @classmethod
    def _only_for_the_sketch(cls, v: float, info: ValidationInfo) -> float:
        # runs only for a value the recipe gives (not the default)
        method = info.data.get("method", "exact")
        if method != "sketch":
            raise ValueError(f"{info.field_name} applies to method: sketch only (method is "
                             f"{method!r})")
        return v


class TopFraction(GlobalStage):
    """Keep the top ``fraction`` of the corpus by ``column``, measured in characters.

    With records sorted by score (descending; ties broken by a hash of the
    seed and id, so the cut is deterministic on any engine), record ``k`` is
    the first whose cumulative characters ``sum_{j<=k} c_j`` reach
    ``fraction * sum_j c_j``; records up to and including ``k`` are kept.
    A missing or NaN score ranks last; ``-0.0`` is ``0.0``.

    ``method: exact`` (default). The summary holds (score, characters,
    tie-break hash) per record: 24 bytes per record. It is spilled
    (``spills``): each task writes its records sorted in selection order, and
    the threshold is found by a streaming k-way merge of those files
    (``select_spilled``; more than ``FAN_IN`` files are merged in passes) that
    holds at most ``MERGE_RECORDS`` records whatever the corpus size or the
    number of files; the result is the in-memory selection's, bit for bit.

    ``method: sketch``. Each task spills a weighted KLL sketch of its records
    (``quantile_sketch.WeightedKLL``; Karnin, Lang & Liberty 2016) instead of
    the records, and the driver merges the tasks' sketches in task order and
    cuts at the first retained record whose estimated cumulative weight
    reaches ``tau = fraction * W``. The sketch retains ``O(k + log W)``
    records, ``k = ceil(sqrt(8 ln(4/delta)) / epsilon)``. With probability at
    least ``1 - delta`` the weight kept, ``W_kept``, satisfies
    ``tau - t <= W_kept < tau + t + w_max``, where ``t <= epsilon W`` is the
    bound of the compactions that ran (``error_bound_weight``) and ``w_max``
    the heaviest record (the exact method overshoots ``tau`` by less than
    one record too). The coins are seeded hashes and each task's sketch
    depends on its records only, so every engine, worker count and resume
    gives the same selection.

    ``artifacts`` publishes ``threshold.json``: the threshold, the method and,
    for the sketch, ``epsilon``, ``delta``, ``error_bound_weight`` (``t``),
    ``error_bound_fraction`` (``t / W``), ``estimated_kept_weight`` and the
    sketch's retained records. The weight ``apply`` kept is counted per batch
    (``StageOutput.weight``) and the manifest reports it beside the threshold
    (``selections``).

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
    method : str
        ``"exact"`` (default) or ``"sketch"``.
    epsilon : float
        Sketch only: the rank error bound as a fraction of the total weight, in
        (0, 0.5]; default 0.001.
    delta : float
        Sketch only: the probability that the bound does not hold, in (0, 1);
        default 1e-6.

    Examples
    --------
    >>> import pyarrow as pa
    >>> stage = TopFraction({"column": "s", "fraction": 0.5, "by": "rows",
    ...                      "method": "sketch", "epsilon": 0.01})
    >>> batch = pa.table({"id": [str(i) for i in range(1000)], "s": list(range(1000)),
    ...                   "text": ["x"] * 1000})
    >>> state = stage.finalize(stage.summarize(batch))
    >>> abs(stage.apply(batch, state).kept.num_rows - 500) <= state["error_bound_weight"] + 1
    True
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
            return self._empty_state()
        if self.params.method == "sketch":
            return self._sketch_state(self._task_sketch(summary))
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

    def _empty_state(self) -> dict[str, Any]:
        state = {"score": np.inf, "tie": 0, "kept_weight": 0, "total_weight": 0}
        if self.params.method == "sketch":
            state = {"score": np.inf, "tie": 0, "estimated_kept_weight": 0, "total_weight": 0,
                     "rows": 0, **self._sketch_fields(None)}
        return state

    def _task_sketch(self, summary) -> WeightedKLL:
        rec = spill_records(*summary)
        return WeightedKLL.from_sorted(rec["k"], rec["t"], rec["w"], self._sketch_k(), self.seed)

    def _sketch_k(self) -> int:
        return capacity_for(self.params.epsilon, self.params.delta)

    def _sketch_fields(self, sk: WeightedKLL | None) -> dict[str, Any]:
        bound = sk.error_bound(self.params.delta) if sk is not None else 0.0
        total = sk.total if sk is not None else 0
        return {"method": "sketch", "epsilon": self.params.epsilon, "delta": self.params.delta,
                "error_bound_weight": bound,
                "error_bound_fraction": bound / total if total else 0.0,
                "max_record_weight": sk.max_weight if sk is not None else 0,
                "sketch_k": self._sketch_k(),
                "retained_items": sk.retained() if sk is not None else 0}

    def _sketch_state(self, sk: WeightedKLL) -> dict[str, Any]:
        if sk.rows == 0:
            return self._empty_state()
        item, est = sk.cut(self.params.fraction)
        return {"score": float(key_score(np.array([item["k"]], dtype=np.uint64))[0]),
                "tie": int(item["t"]), "estimated_kept_weight": est, "total_weight": sk.total,
                "rows": sk.rows, **self._sketch_fields(sk)}

    def spill_summary(self, summary, sink: BinaryIO) -> None:
        """Exact: one task's records as ``SPILL_DTYPE`` rows in selection order,
        after a header (rows, total weight). Sketch: the task's sketch."""
        if self.params.method == "sketch":
            self._task_sketch(summary).write(sink)
            return
        rec = spill_records(*summary)
        sink.write(np.array([rec.size, int(rec["w"].sum())], dtype="<i8").tobytes())
        sink.write(rec.tobytes())

    def finalize_spilled(self, sources: list[Callable[[], BinaryIO]]) -> dict[str, Any]:
        if self.params.method == "exact":
            return select_spilled(sources, self.params.fraction)
        acc: WeightedKLL | None = None
        for open_ in sources:  # task order, one sketch read at a time
            with open_() as f:
                sk = WeightedKLL.read(f)
            acc = sk if acc is None else acc.merge(sk)
        return self._empty_state() if acc is None else self._sketch_state(acc)

    def apply(self, batch: pa.Table, state: dict[str, Any]) -> StageOutput:
        s, w, tie = self._keys(batch)
        keep = (s > state["score"]) | ((s == state["score"]) & (tie <= np.uint64(state["tie"])))
        sign = -1 if self.params.order == "min" else 1
        out = split_batch(batch, keep, self.name, "below_threshold",
                          np.array([f"threshold={sign * state['score']:.6g}"] * batch.num_rows,
                                   dtype=object))
        out.weight = (int(w.sum()), int(w[keep].sum()))
        return out

    def artifacts(self, state: dict[str, Any]) -> dict[str, bytes]:
        out = dict(state)
        out["threshold"] = (-1 if self.params.order == "min" else 1) * out.pop("score")
        out["column"], out["fraction"], out["by"] = (self.params.column, self.params.fraction,
                                                     self.params.by)
        out.setdefault("method", "exact")
        if out["method"] == "exact":  # the exact cut has no rank error
            out["error_bound_weight"], out["error_bound_fraction"] = 0, 0.0
        return {"threshold.json": json.dumps(out, indent=2).encode()}
