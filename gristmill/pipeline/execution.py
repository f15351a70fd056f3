"""Engine-independent execution: how stages are cut into segments, how a batch
goes through a segment, and the mergeable counts and statistics of a task.

Every engine (local, dask, beam) uses these pieces, so the same stage objects
run the same way everywhere. A *segment* is the run of row-local stages
between two barriers (global or shuffle stages)::

    [entry.apply] -> row stages ... -> [exit.summarize | exit.keys]

The first segment starts at the readers; the last one ends at the writer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gristmill.pipeline import observe
from gristmill.pipeline.stage import GlobalStage, RowStage, ShuffleStage, Stage, StageOutput

# log-spaced character-length bins shared by every histogram, so they merge
LENGTH_BINS = np.unique(np.round(np.logspace(0, 7, 71))).astype(np.int64)
LENGTH_BINS = np.concatenate([[0], LENGTH_BINS])


@dataclass
class Segment:
    index: int
    entry: Stage | None  # barrier whose apply() starts the segment
    rows: list[RowStage]
    exit: Stage | None  # barrier summarized (global) or keyed (shuffle) at the end
    #: per stage name, the text-redacting stages at or after it (see ``observe``)
    redactors: dict[str, list[Stage]] = field(default_factory=dict)
    #: columns any stage of the recipe declares it adds (score columns)
    score_columns: tuple[str, ...] = ()

    @property
    def stages(self) -> list[Stage]:
        return ([self.entry] if self.entry else []) + list(self.rows)

    @property
    def is_last(self) -> bool:
        return self.exit is None


def plan_segments(stages: list[Stage]) -> list[Segment]:
    """Cut the stage list at every global or shuffle stage."""
    segments: list[Segment] = []
    entry: Stage | None = None
    rows: list[RowStage] = []
    for stage in stages:
        if isinstance(stage, (GlobalStage, ShuffleStage)):
            segments.append(Segment(len(segments), entry, rows, stage))
            entry, rows = stage, []
        elif isinstance(stage, RowStage):
            rows.append(stage)
        else:
            raise TypeError(f"stage {stage.name!r} is neither row, global nor shuffle")
    segments.append(Segment(len(segments), entry, rows, None))
    redactors = {st.name: [r for r in stages[i:] if observe.redacts_text(r)]
                 for i, st in enumerate(stages)}
    declared = tuple(dict.fromkeys(c for st in stages for c in st.output_columns()))
    for seg in segments:
        seg.redactors = redactors
        seg.score_columns = declared
    return segments


def text_lengths(batch: pa.Table) -> np.ndarray:
    """Characters of every record's text (or prompt).

    A chunk whose bytes are all ASCII (checked with numpy, several times faster
    than counting code points) has one character per byte: its lengths are the
    differences of its offsets. Any other chunk is counted by ``utf8_length``.
    """
    col = batch.column("text" if "text" in batch.column_names else "prompt")
    parts = [_chunk_lengths(chunk) for chunk in col.chunks]
    if not parts:
        return np.zeros(0, np.int64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _chunk_lengths(chunk: pa.Array) -> np.ndarray:
    offset_type = {pa.string(): np.int32, pa.large_string(): np.int64}.get(chunk.type)
    if offset_type is not None and not chunk.null_count and len(chunk):
        bufs = chunk.buffers()
        offsets = np.frombuffer(bufs[1], offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = (np.frombuffer(bufs[2], np.uint8)[offsets[0]:offsets[-1]] if bufs[2] is not None
                else np.zeros(0, np.uint8))
        if not data.size or data.max() < 0x80:
            return np.diff(offsets).astype(np.int64)
    return pc.utf8_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64)


def _batch_figures(batch: pa.Table) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Length histogram of a batch and its (domain, docs, chars) in first-seen order."""
    lengths = text_lengths(batch)
    hist = np.histogram(lengths, bins=np.append(LENGTH_BINS, np.iinfo(np.int64).max))[0]
    if "domain" not in batch.column_names:
        return hist, [("(none)", int(lengths.size), int(lengths.sum()))] if lengths.size else []
    dom = batch.column("domain")
    if dom.null_count:
        dom = pc.fill_null(dom, "(none)")
    enc = pc.dictionary_encode(dom.combine_chunks() if isinstance(dom, pa.ChunkedArray) else dom)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    k = len(enc.dictionary)
    docs = np.bincount(idx, minlength=k)
    # float64 sums are exact below 2**53 characters, far above any batch
    chars = np.rint(np.bincount(idx, weights=lengths, minlength=k)).astype(np.int64)
    return hist, [(d, int(n), int(c)) for d, n, c in
                  zip(enc.dictionary.to_pylist(), docs, chars, strict=True) if n]


@dataclass
class TaskStats:
    """Counts and statistics of one task in one segment; merge() is associative."""

    counts: dict[str, dict[str, Any]] = field(default_factory=dict)
    length_hist_in: np.ndarray | None = None
    length_hist_out: np.ndarray | None = None
    domains_in: dict[str, list[int]] = field(default_factory=dict)
    domains_out: dict[str, list[int]] = field(default_factory=dict)
    #: stage -> phase -> [wall s, CPU s]; and what ``observe`` records
    timings: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)
    clusters: dict[str, Any] = field(default_factory=dict)
    #: (batch, histogram, per-domain figures) of the last batch observed; not merged or saved
    _last: tuple[pa.Table, np.ndarray, list[tuple[str, int, int]]] | None = field(
        default=None, repr=False, compare=False)

    def count(self, stage: str, n_in: int, out: StageOutput) -> None:
        c = self.counts.setdefault(stage, {"in": 0, "kept": 0, "added": 0, "dropped": {}})
        c["in"] += n_in
        c["kept"] += out.kept.num_rows
        # a stage may repeat rows (a mixture upsampling a domain): count the copies
        c["added"] += max(0, out.kept.num_rows + out.dropped.num_rows - n_in)
        if out.weight is not None:
            c["weight_in"] = c.get("weight_in", 0) + out.weight[0]
            c["weight_kept"] = c.get("weight_kept", 0) + out.weight[1]
        if out.dropped.num_rows:
            vc = pc.value_counts(out.dropped.column("reason")).to_pylist()
            for item in vc:
                c["dropped"][item["values"]] = c["dropped"].get(item["values"], 0) + item["counts"]

    def observe(self, batch: pa.Table, where: str) -> None:
        """Length histogram and per-domain docs/chars, at the input or the output.

        The figures of the last batch observed are kept with it: a batch that no
        stage changed (the same table object at the output as at the input) is
        counted again without being measured again.
        """
        if self._last is not None and self._last[0] is batch:
            hist, per_domain = self._last[1], self._last[2]
        else:
            hist, per_domain = _batch_figures(batch)
            self._last = (batch, hist, per_domain)
        attr = f"length_hist_{where}"
        cur = getattr(self, attr)
        setattr(self, attr, hist.copy() if cur is None else cur + hist)
        doms = getattr(self, f"domains_{where}")
        for d, docs, chars in per_domain:
            a = doms.setdefault(d, [0, 0])
            a[0] += docs
            a[1] += chars

    def merge(self, other: TaskStats) -> TaskStats:
        for stage, c in other.counts.items():
            mine = self.counts.setdefault(stage, {"in": 0, "kept": 0, "added": 0, "dropped": {}})
            mine["in"] += c["in"]
            mine["kept"] += c["kept"]
            mine["added"] += c.get("added", 0)
            for key in ("weight_in", "weight_kept"):
                if key in c:
                    mine[key] = mine.get(key, 0) + c[key]
            for r, n in c["dropped"].items():
                mine["dropped"][r] = mine["dropped"].get(r, 0) + n
        for where in ("in", "out"):
            h = getattr(other, f"length_hist_{where}")
            if h is not None:
                cur = getattr(self, f"length_hist_{where}")
                setattr(self, f"length_hist_{where}", np.array(h) if cur is None
                        else np.asarray(cur) + np.asarray(h))
            for k, (docs, chars) in getattr(other, f"domains_{where}").items():
                a = getattr(self, f"domains_{where}").setdefault(k, [0, 0])
                a[0] += docs
                a[1] += chars
        observe.merge_timings(self.timings, other.timings)
        observe.merge_samples(self.samples, other.samples)
        observe.merge_columns(self.columns, other.columns)
        observe.merge_clusters(self.clusters, other.clusters)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "length_hist_in": None if self.length_hist_in is None else
            np.asarray(self.length_hist_in).tolist(),
            "length_hist_out": None if self.length_hist_out is None else
            np.asarray(self.length_hist_out).tolist(),
            "domains_in": self.domains_in,
            "domains_out": self.domains_out,
            "timings": self.timings,
            "samples": self.samples,
            "columns": self.columns,
            "clusters": self.clusters,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskStats:
        return cls(counts=d["counts"],
                   length_hist_in=None if d["length_hist_in"] is None
                   else np.asarray(d["length_hist_in"]),
                   length_hist_out=None if d["length_hist_out"] is None
                   else np.asarray(d["length_hist_out"]),
                   domains_in={k: list(v) for k, v in d["domains_in"].items()},
                   domains_out={k: list(v) for k, v in d["domains_out"].items()},
                   timings=d.get("timings", {}), samples=d.get("samples", {}),
                   columns=d.get("columns", {}), clusters=d.get("clusters", {}))


def run_segment_batch(segment: Segment, batch: pa.Table, entry_state: Any, stats: TaskStats,
                      dropped: list[pa.Table] | None) -> pa.Table:
    """Send one batch through the segment's entry apply and row stages; return the kept rows.

    Times every stage call and lets ``observe`` sample what it kept and dropped;
    the rows leaving the last segment are the output, whose score columns are
    sampled as ``kept``.
    """
    for stage in segment.stages:
        if batch.num_rows == 0:
            break
        n_in = batch.num_rows
        entry = stage is segment.entry
        with observe.clock(stats.timings, stage.name, "apply" if entry else "process"):
            if entry:
                out = stage.apply(batch, entry_state)  # type: ignore[union-attr]
            else:
                out = stage.process(batch)  # type: ignore[union-attr]
        stats.count(stage.name, n_in, out)
        with observe.clock(stats.timings, "(observe)", "samples"):
            observe.observe_stage(stats, stage, batch, out, entry_state if entry else None,
                                  segment.redactors.get(stage.name, []))
        if dropped is not None and out.dropped.num_rows:
            dropped.append(out.dropped)
        batch = out.kept
    if segment.is_last and batch.num_rows and segment.stages:
        with observe.clock(stats.timings, "(observe)", "samples"):
            observe.observe_columns(stats.columns, batch, _kept_columns(batch, segment),
                                    "kept", segment.stages[0].seed)
    return batch


def _kept_columns(batch: pa.Table, segment: Segment) -> list[str]:
    """Score columns of the output: every number column and the declared string ones."""
    return [f.name for f in batch.schema
            if f.name in segment.score_columns or pa.types.is_integer(f.type)
            or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)]


#: input bytes per shuffle key partition when ``engine.shuffle_partitions`` is not set
SHUFFLE_PARTITION_BYTES = 32 << 20


def shuffle_partitions_for(input_bytes: int, target: int = SHUFFLE_PARTITION_BYTES) -> int:
    """Key partitions for a corpus of ``input_bytes``: ``ceil(input_bytes / target)``, at least 1.

    A partition's keys are read and reduced by one process, so a partition
    count that grows with the corpus keeps that process's memory the same at
    any corpus size (MinHash keys are about 1.8x the input bytes with the
    default bands and 8-bit sketches). It depends on the input only, never
    on the worker count; the output does not depend on it at all (every key
    group lands whole in one partition, and the reduced edges are resolved
    as a set).

    Examples
    --------
    >>> shuffle_partitions_for(0), shuffle_partitions_for(200 << 20)
    (1, 7)
    """
    return max(1, -(-int(input_bytes) // int(target)))


def partition_keys(keys: pa.Table, partitions: int) -> list[pa.Table]:
    """Split a keys table by ``key % partitions`` (whole groups land together)."""
    k = keys.column("key").to_numpy(zero_copy_only=False).astype(np.uint64)
    part = (k % np.uint64(partitions)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    taken = keys.take(pa.array(order))
    return [taken.slice(bounds[p], bounds[p + 1] - bounds[p]) for p in range(partitions)]


def reason_totals(counts: dict[str, dict[str, Any]]) -> Counter:
    total: Counter = Counter()
    for c in counts.values():
        total.update(c["dropped"])
    return total
