"""What a run records about its data, beside the counts: time per stage, sample
records per stage and reason, score distributions and near-duplicate pairs.

Everything here is mergeable (sums, bottom-k sets, capped counters), so every
engine collects it per task and the runner merges it, exactly like the counts.

Sampling is deterministic and independent of partitioning: every record's
priority is ``mix64(row key, seed, SAMPLE_SALT)`` (``hashing.record_hash``),
and a sample is the ``k`` records with the smallest priority, a *bottom-k*
sample. The bottom-k of a union is the bottom-k of the bottom-k's, so tasks
keep their own and any merge order gives the same sample on every engine and
worker count. One salt for all stages means a record that is sampled at one
stage is sampled at the next as long as it survives, so the samples trace the
same records through the pipeline.

Samples are taken from the records *as they left each stage* (kept rows from
the stage's output, dropped rows as they entered it). A stage that redacts text
(``type_name == "pii"`` or ``redacts_text = True``) runs over every sample taken
before it, on the worker, before anything is stored: a report never shows text
that a redacting stage later in the recipe would have replaced. A sample that
the redacting stage itself would drop is stored with its text withheld.

Time per stage is wall-clock (``time.perf_counter``) and CPU
(``time.process_time``, the whole worker process, so threads a stage starts are
included) seconds, summed over tasks and workers, per phase: ``process``
(row stages), ``summarize``/``keys`` (the tasks' half of a barrier),
``barrier`` (merging summaries or reducing and resolving keys, outside the
tasks) and ``apply``. The pseudo-stages ``read``, ``spill`` and ``write`` are the readers,
the spill files between segments and the shard writer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gristmill.pipeline import storage
from gristmill.pipeline.hashing import mix64, record_hash
from gristmill.pipeline.stage import ROW_KEY, Stage, StageOutput

SAMPLE_SALT = "gristmill:sample"
#: records kept per (stage, kept) and per (stage, drop reason)
RECORDS_PER_GROUP = 20
#: values kept per score column and point (scored / kept) for the distributions
VALUES_PER_COLUMN = 1000
#: near-duplicate clusters shown per dedup stage
CLUSTERS_PER_STAGE = 6
#: characters of text (or prompt) a sample keeps; the full length is recorded
TEXT_CHARS = 600
RESPONSE_CHARS = 300
#: a string column a stage adds is counted by value (a response source, a
#: language) while it has at most this many distinct values of at most
#: CATEGORY_CHARS characters; past that it is free text and is not counted
MAX_CATEGORIES = 40
CATEGORY_CHARS = 64
#: benchmarks switch this off to measure what observing costs
ENABLED = True

#: columns every reader writes; never treated as scores
BASE_COLUMNS = frozenset({ROW_KEY, "id", "text", "domain", "source", "prompt", "responses",
                          "response_sources", "response"})


def redacts_text(stage: Stage) -> bool:
    """Whether ``stage`` rewrites text to hide something (a ``pii`` stage)."""
    return bool(getattr(stage, "redacts_text", False)) or stage.type_name == "pii"


# ---------------------------------------------------------------------------
# time

def add_time(timings: dict[str, dict[str, list[float]]], stage: str, phase: str,
             wall: float, cpu: float) -> None:
    slot = timings.setdefault(stage, {}).setdefault(phase, [0.0, 0.0])
    slot[0] += wall
    slot[1] += cpu


def merge_timings(into: dict[str, dict[str, list[float]]],
                  other: dict[str, dict[str, list[float]]]) -> None:
    for stage, phases in other.items():
        for phase, (wall, cpu) in phases.items():
            add_time(into, stage, phase, wall, cpu)


@contextmanager
def clock(timings: dict[str, dict[str, list[float]]], stage: str, phase: str) -> Iterator[None]:
    """Add the wall and CPU seconds of the ``with`` body to ``timings[stage][phase]``."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        add_time(timings, stage, phase, time.perf_counter() - w, time.process_time() - c)


def timed_iter(items: Iterable[Any], timings: dict[str, dict[str, list[float]]], stage: str,
               phase: str) -> Iterator[Any]:
    """Yield from ``items``, timing only the time spent producing each item."""
    it = iter(items)
    while True:
        w, c = time.perf_counter(), time.process_time()
        try:
            item = next(it)
        except StopIteration:
            add_time(timings, stage, phase, time.perf_counter() - w, time.process_time() - c)
            return
        add_time(timings, stage, phase, time.perf_counter() - w, time.process_time() - c)
        yield item


def _timings_dir(work: Path) -> Path:
    return storage.as_path(work) / "timings"


def start_clock() -> tuple[float, float]:
    """(wall, CPU) now, for ``save_barrier_time``."""
    return time.perf_counter(), time.process_time()


def save_barrier_time(work: Path, stage: str, phase: str, started: tuple[float, float]) -> None:
    """Save the time since ``started`` of a barrier step (it runs outside any
    task: on the driver, a Dask worker or in a Beam transform) as a small file
    under ``work/timings``; ``barrier_times`` adds them up at commit."""
    save_time(work, stage, phase, time.perf_counter() - started[0],
              time.process_time() - started[1])


def save_time(work: Path, stage: str, phase: str, wall: float, cpu: float) -> None:
    """Save measured seconds as a file under ``work/timings`` (see ``barrier_times``)."""
    body = json.dumps({"stage": stage, "phase": phase, "wall": wall, "cpu": cpu})
    path = _timings_dir(work) / f"{stage}.{phase}.{uuid.uuid4().hex}.json"
    storage.write_bytes(path, body.encode())


def barrier_times(work: Path) -> dict[str, dict[str, list[float]]]:
    """Sum of every ``barrier_clock`` file under ``work/timings``."""
    out: dict[str, dict[str, list[float]]] = {}
    for f in storage.glob_files(_timings_dir(work) / "*.json"):
        d = json.loads(f.read_text())
        add_time(out, d["stage"], d["phase"], d["wall"], d["cpu"])
    return out


def stage_timings(timings: dict[str, dict[str, list[float]]],
                  stage_counts: list[dict[str, Any]], read: int,
                  written: int) -> list[dict[str, Any]]:
    """Per stage (in recipe order, ``read`` first and ``write`` last): wall and
    CPU seconds summed over phases, the phases, and records in per wall second."""
    rows_in = {"read": read, "write": written}
    rows_in.update({s["stage"]: s["in"] for s in stage_counts})
    names = ["read"] + [s["stage"] for s in stage_counts] + ["spill", "write"]
    names += sorted(set(timings) - set(names))
    out = []
    for name in names:
        phases = timings.get(name)
        if not phases:
            continue
        wall = sum(v[0] for v in phases.values())
        cpu = sum(v[1] for v in phases.values())
        n = rows_in.get(name)
        out.append({"stage": name, "wall_s": round(wall, 6), "cpu_s": round(cpu, 6),
                    "records_in": n,
                    "records_per_s": round(n / wall, 1) if n is not None and wall > 0 else None,
                    "phases": {p: [round(v[0], 4), round(v[1], 4)]
                               for p, v in sorted(phases.items())}})
    return out


# ---------------------------------------------------------------------------
# sample records

def _text_column(table: pa.Table) -> str | None:
    for c in ("text", "prompt"):
        if c in table.column_names:
            return c
    return None


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _records(table: pa.Table, priority: np.ndarray, details: list[str | None] | None = None
             ) -> list[dict[str, Any]]:
    """Small JSON records of the rows of ``table`` (text truncated)."""
    tcol = _text_column(table)
    cols = {c: table.column(c).to_pylist() for c in table.column_names
            if c in ("id", "source", "domain", ROW_KEY, "responses", "response", tcol)
            or (c not in BASE_COLUMNS and _is_number(table.schema.field(c).type))}
    out = []
    for i in range(table.num_rows):
        text = cols[tcol][i] if tcol else None
        rec: dict[str, Any] = {
            "p": int(priority[i]),
            "key": cols[ROW_KEY][i] if ROW_KEY in cols else None,
            "id": cols["id"][i] if "id" in cols else None,
            "source": cols["source"][i] if "source" in cols else None,
            "domain": cols["domain"][i] if "domain" in cols else None,
            "text": None if text is None else text[:TEXT_CHARS],
            "chars": None if text is None else len(text),
        }
        if "response" in cols and cols["response"][i] is not None:
            rec["response"] = cols["response"][i][:RESPONSE_CHARS]
        if "responses" in cols and cols["responses"][i] is not None:
            rec["responses"] = [r[:RESPONSE_CHARS] if isinstance(r, str) else r
                                for r in cols["responses"][i][:6]]
        scores = {}
        for c, vals in cols.items():
            if c in BASE_COLUMNS:
                continue
            v = vals[i]
            if isinstance(v, float):
                v = None if v != v else round(v, 6)  # NaN is not JSON
            scores[c] = v
        if scores:
            rec["scores"] = scores
        if details is not None:
            rec["detail"] = details[i]
        out.append(rec)
    return out


_SET_UP: set[int] = set()


def _redact(table: pa.Table, redactors: list[Stage]) -> pa.Table:
    """Run the text-redacting stages over sample rows; rows one of them drops get
    their text withheld (never their original text)."""
    for r in redactors:
        if id(r) not in _SET_UP:
            r.setup()  # a later segment's stage: not yet set up in this worker
            _SET_UP.add(id(r))
        out = r.process(table)
        if out.kept.num_rows == table.num_rows:
            redacted = out.kept
        else:
            redacted = _withhold(table, out, r.name)
        table = pa.Table.from_arrays(
            [redacted.column(c) if c in redacted.column_names else table.column(c)
             for c in table.column_names], names=table.column_names)
    return table


def _withhold(table: pa.Table, out: StageOutput, name: str) -> pa.Table:
    if ROW_KEY not in table.column_names:
        keys = table.column("id").to_pylist()
        kept_keys = out.kept.column("id").to_pylist()
    else:
        keys = table.column(ROW_KEY).to_pylist()
        kept_keys = out.kept.column(ROW_KEY).to_pylist()
    where = {k: i for i, k in enumerate(kept_keys)}
    cols = {}
    for c in table.column_names:
        if c in ("text", "prompt", "response", "responses"):
            src = out.kept.column(c).to_pylist() if c in out.kept.column_names else None
            note = f"[withheld: the {name} stage would drop this record]"
            vals = [src[where[k]] if src is not None and k in where else
                    ([note] if c == "responses" else note) for k in keys]
            cols[c] = pa.array(vals, table.schema.field(c).type)
        else:
            cols[c] = table.column(c)
    return pa.table(cols)


def _bottom_k(priority: np.ndarray, threshold: int | None, k: int) -> np.ndarray:
    """Indices of the (at most k) smallest priorities below ``threshold``, sorted."""
    cand = np.arange(priority.size) if threshold is None else \
        np.flatnonzero(priority < np.uint64(threshold))
    if cand.size > k:
        part = np.argpartition(priority[cand], k - 1)[:k]
        cand = cand[part]
    return cand[np.argsort(priority[cand], kind="stable")]


def _threshold(group: list[dict[str, Any]], k: int) -> int | None:
    return group[-1]["p"] if len(group) >= k else None


def merge_records(a: list[dict[str, Any]], b: list[dict[str, Any]],
                  k: int = RECORDS_PER_GROUP) -> list[dict[str, Any]]:
    """Bottom-k of two samples (one record per row key; a mixture's copies of a
    record count once)."""
    seen: set = set()
    out = []
    for rec in sorted(a + b, key=lambda r: (r["p"], str(r.get("id")))):
        ident = rec.get("key") if rec.get("key") is not None else rec.get("id")
        if ident in seen:
            continue
        seen.add(ident)
        out.append(rec)
        if len(out) >= k:
            break
    return out


def merge_samples(into: dict[str, Any], other: dict[str, Any]) -> None:
    for stage, groups in other.items():
        mine = into.setdefault(stage, {"kept": [], "dropped": {}})
        mine["kept"] = merge_records(mine["kept"], groups.get("kept", []))
        for reason, recs in groups.get("dropped", {}).items():
            mine["dropped"][reason] = merge_records(mine["dropped"].get(reason, []), recs)


# ---------------------------------------------------------------------------
# score distributions

def _add_values(slot: dict[str, list] | None, table: pa.Table, column: str,
                priority: np.ndarray) -> dict[str, list]:
    """Bottom-k of (priority, value) of the non-missing values of ``column``."""
    arr = table.column(column)
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    ok = np.flatnonzero(np.isfinite(values))
    slot = slot or {"p": [], "v": []}
    threshold = slot["p"][-1] if len(slot["p"]) >= VALUES_PER_COLUMN else None
    idx = ok[_bottom_k(priority[ok], threshold, VALUES_PER_COLUMN)]
    if idx.size == 0:
        return slot
    return merge_values(slot, {"p": priority[idx], "v": values[idx]})


def merge_values(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list]:
    """Bottom-k of two value samples ``{"p": priorities, "v": values}`` (sorted by p)."""
    p = np.concatenate([np.asarray(a["p"], dtype=np.uint64), np.asarray(b["p"], dtype=np.uint64)])
    v = np.concatenate([np.asarray(a["v"], dtype=np.float64),
                        np.asarray(b["v"], dtype=np.float64)])
    order = np.argsort(p, kind="stable")[:VALUES_PER_COLUMN]
    return {"p": p[order].tolist(), "v": v[order].tolist()}


def _add_categories(counts: dict[str, Any], table: pa.Table, column: str) -> None:
    if counts.get("free_text"):
        return
    vc = pc.value_counts(table.column(column)).to_pylist()
    for item in vc:
        v = item["values"]
        if v is not None and len(v) > CATEGORY_CHARS:
            counts.clear()
            counts["free_text"] = True
            return
        key = "(null)" if v is None else v
        counts[key] = counts.get(key, 0) + item["counts"]
    if len(counts) > MAX_CATEGORIES:
        counts.clear()
        counts["free_text"] = True


def merge_categories(into: dict[str, Any], other: dict[str, Any]) -> None:
    if into.get("free_text") or other.get("free_text"):
        into.clear()
        into["free_text"] = True
        return
    for k, n in other.items():
        into[k] = into.get(k, 0) + n
    if len(into) > MAX_CATEGORIES:
        into.clear()
        into["free_text"] = True


def merge_columns(into: dict[str, Any], other: dict[str, Any]) -> None:
    for col, d in other.items():
        mine = into.setdefault(col, {"stage": d.get("stage"), "kind": d["kind"]})
        if mine.get("stage") is None:
            mine["stage"] = d.get("stage")
        for point in ("scored", "kept"):
            if point not in d:
                continue
            if d["kind"] == "numeric":
                mine[point] = merge_values(mine.get(point) or {"p": [], "v": []}, d[point])
            else:
                merge_categories(mine.setdefault(point, {}), d[point])


def observe_columns(columns: dict[str, Any], table: pa.Table, names: Iterable[str],
                    point: str, seed: int, stage: str | None = None) -> None:
    """Add the values of score columns ``names`` of ``table`` at ``point``."""
    if not ENABLED or table.num_rows == 0:
        return
    priority = None
    for c in names:
        if c not in table.column_names or c in BASE_COLUMNS:
            continue
        t = table.schema.field(c).type
        if _is_number(t):
            kind = "numeric"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            kind = "category"
        else:
            continue
        d = columns.setdefault(c, {"stage": stage, "kind": kind})
        if d.get("stage") is None:
            d["stage"] = stage
        if kind == "numeric":
            if priority is None:
                priority = record_hash(table, seed, SAMPLE_SALT)
            d[point] = _add_values(d.get(point), table, c, priority)
        else:
            _add_categories(d.setdefault(point, {}), table, c)


# ---------------------------------------------------------------------------
# near-duplicate clusters

_CLUSTER_CACHE: dict[int, tuple[Any, dict[int, tuple[int, int]]]] = {}


def chosen_clusters(state: pa.Table, seed: int,
                    cache: bool = True) -> dict[int, tuple[int, int]]:
    """survivor key -> (priority, member key) for the clusters with the smallest
    survivor priority; the member is the cluster's smallest-priority dropped one.

    ``cache`` keeps the answer (and so the table) for the next call with the same
    table; an engine that writes the table away and drops it passes False."""
    hit = _CLUSTER_CACHE.get(id(state))
    if hit is not None and hit[0] is state:
        return hit[1]
    surv = state.column("survivor").to_numpy(zero_copy_only=False).astype(np.uint64)
    keys = state.column(ROW_KEY).to_numpy(zero_copy_only=False).astype(np.uint64)
    ps = mix64(surv, seed, SAMPLE_SALT)
    uniq, first = np.unique(surv, return_index=True)
    order = np.argsort(ps[first], kind="stable")[:CLUSTERS_PER_STAGE]
    chosen: dict[int, tuple[int, int]] = {}
    pm = mix64(keys, seed, SAMPLE_SALT)
    for j in order:
        s = uniq[j]
        members = np.flatnonzero(surv == s)
        m = members[np.argmin(pm[members])]
        chosen[int(s)] = (int(ps[first[j]]), int(keys[m]))
    if cache:
        if len(_CLUSTER_CACHE) > 8:
            _CLUSTER_CACHE.clear()
        _CLUSTER_CACHE[id(state)] = (state, chosen)
    return chosen


def merge_clusters(into: dict[str, Any], other: dict[str, Any]) -> None:
    for stage, clusters in other.items():
        mine = into.setdefault(stage, {})
        for s, c in clusters.items():
            cur = mine.setdefault(s, {"p": c["p"]})
            for role in ("survivor", "member"):
                if c.get(role) is not None:
                    cur[role] = c[role]
        if len(mine) > CLUSTERS_PER_STAGE:
            keep = sorted(mine, key=lambda s: mine[s]["p"])[:CLUSTERS_PER_STAGE]
            into[stage] = {s: mine[s] for s in keep}


# ---------------------------------------------------------------------------
# one stage's output

def observe_stage(stats: Any, stage: Stage, batch_in: pa.Table, out: StageOutput,
                  state: Any, redactors: list[Stage]) -> None:
    """Record samples, new score columns and duplicate pairs of one stage call.

    ``redactors`` are the text-redacting stages at or after ``stage``.
    """
    if not ENABLED:
        return
    seed = stage.seed
    later = [r for r in redactors if r is not stage]
    groups = stats.samples.setdefault(stage.name, {"kept": [], "dropped": {}})
    kept = out.kept
    if kept.num_rows:
        pk = record_hash(kept, seed, SAMPLE_SALT)
        idx = _bottom_k(pk, _threshold(groups["kept"], RECORDS_PER_GROUP), RECORDS_PER_GROUP)
        if idx.size:
            rows = kept.take(pa.array(idx))
            if later:
                rows = _redact(rows, later)
            groups["kept"] = merge_records(groups["kept"], _records(rows, pk[idx]))
        new_cols = [c for c in kept.column_names
                    if c not in batch_in.column_names and c not in BASE_COLUMNS]
        if new_cols and not redacts_text(stage):
            observe_columns(stats.columns, kept, new_cols, "scored", seed, stage.name)
    dropped = out.dropped
    if dropped.num_rows:
        pd = record_hash(dropped, seed, SAMPLE_SALT)
        reasons = dropped.column("reason").to_pylist()
        details = dropped.column("detail").to_pylist()
        by_reason: dict[str, list[int]] = {}
        for i, r in enumerate(reasons):
            by_reason.setdefault(r, []).append(i)
        for reason, rows_of in by_reason.items():
            group = groups["dropped"].get(reason, [])
            sub = np.asarray(rows_of)
            pick = sub[_bottom_k(pd[sub], _threshold(group, RECORDS_PER_GROUP),
                                 RECORDS_PER_GROUP)]
            if pick.size == 0:
                continue
            rows = _rows_of(batch_in, dropped.take(pa.array(pick)))
            if rows is None:
                continue
            if redactors:
                rows = _redact(rows, redactors)
            recs = _records(rows, pd[pick], [details[i] for i in pick])
            groups["dropped"][reason] = merge_records(group, recs)
    chosen = getattr(state, "chosen_clusters", None)  # per-file drop lists: chosen already
    if chosen is None and isinstance(state, pa.Table) and state.num_rows \
            and {ROW_KEY, "survivor"} <= set(state.column_names):
        chosen = chosen_clusters(state, stage.seed)
    if chosen and ROW_KEY in batch_in.column_names:
        _observe_clusters(stats, stage, batch_in, out, chosen, redactors, later)


def _rows_of(batch: pa.Table, dropped: pa.Table) -> pa.Table | None:
    """The rows of ``batch`` that ``dropped`` names, in ``dropped``'s order."""
    col = ROW_KEY if ROW_KEY in batch.column_names and ROW_KEY in dropped.column_names \
        else "id"
    pos = pc.index_in(dropped.column(col), value_set=batch.column(col).combine_chunks())
    if pos.null_count:
        return None
    return batch.take(pos)


def _observe_clusters(stats: Any, stage: Stage, batch_in: pa.Table, out: StageOutput,
                      chosen: dict[int, tuple[int, int]], redactors: list[Stage],
                      later: list[Stage]) -> None:
    mine = stats.clusters.setdefault(stage.name, {})
    members = {m: s for s, (_, m) in chosen.items()}
    keys = batch_in.column(ROW_KEY).to_numpy(zero_copy_only=False).astype(np.uint64)
    detail_of = {}
    if out.dropped.num_rows:
        detail_of = dict(zip(out.dropped.column(ROW_KEY).to_pylist(),
                             out.dropped.column("detail").to_pylist(), strict=True))
    for role, wanted, red in (("survivor", chosen, later), ("member", members, redactors)):
        idx = np.flatnonzero(np.isin(keys, np.fromiter(wanted, dtype=np.uint64)))
        if idx.size == 0:
            continue
        rows = batch_in.take(pa.array(idx))
        if red:
            rows = _redact(rows, red)
        pr = mix64(keys[idx], stage.seed, SAMPLE_SALT)
        dets = [detail_of.get(int(k)) for k in keys[idx]]
        for rec in _records(rows, pr, dets):
            s = rec["key"] if role == "survivor" else members[rec["key"]]
            c = mine.setdefault(str(s), {"p": chosen[s][0]})
            c[role] = rec
