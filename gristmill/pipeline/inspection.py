"""Looking into finished outputs: sample records with their fate, time per
stage, and the difference between two runs.

The command line (``gristmill inspect``, ``gristmill diff``) only parses
arguments and prints what these functions return.

Records are matched between runs by input file and line (or Parquet row),
from the pipeline's row key and each manifest's file list, so two runs over
the same files compare record by record whatever their recipes did; the
user's ``id`` is only shown.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.pipeline.observe import RECORDS_PER_GROUP
from gristmill.pipeline.stage import KEY_POS_BITS, KEY_POS_MASK, ROW_KEY


class OutputError(ValueError):
    """An output folder that cannot be inspected (no manifest, not finished)."""


def load_output(out: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and ``stats.json`` of a finished output folder."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.exists():
        partial = (out / "_work").exists()
        raise OutputError(f"no manifest in {out}" + (
            " (a run is in progress or was interrupted; run it again to resume)"
            if partial else ""))
    manifest = json.loads(path.read_text())
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return manifest, stats


def where(key: int | None, manifest: dict[str, Any]) -> tuple[str, int | None]:
    """(input file, line or row) of a row key."""
    if key is None:
        return "?", None
    index, pos = int(key) >> KEY_POS_BITS, int(key) & KEY_POS_MASK
    files = manifest.get("files", [])
    entry = next((f for f in files if f.get("index") == index), None)
    if entry is None and index < len(files):
        entry = files[index]
    return (entry or {}).get("path", f"file #{index}"), pos


def sample_records(manifest: dict[str, Any], stats: dict[str, Any], n: int,
                   stage: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
    """Up to ``n`` sample records per stage and fate, with their fate.

    ``stage`` keeps one stage; ``reason`` keeps one drop reason (``kept`` for
    the kept samples). Raises ``OutputError`` naming the valid values when a
    filter matches nothing.
    """
    samples = stats.get("samples") or {}
    if not samples:
        raise OutputError("this output has no sample records (written by an older gristmill, "
                          "or sampling was off)")
    if stage is not None and stage not in samples:
        raise OutputError(f"no stage {stage!r} in this output; stages: {', '.join(samples)}")
    order = [s["stage"] for s in manifest["counts"]["stages"] if s["stage"] in samples]
    out = []
    reasons_seen = set()
    for st in order:
        if stage is not None and st != stage:
            continue
        groups = samples[st]
        fates = [("dropped", r, recs) for r, recs in sorted(groups.get("dropped", {}).items())]
        fates.append(("kept", None, groups.get("kept", [])))
        for fate, why, recs in fates:
            reasons_seen.add(why or "kept")
            if reason is not None and (why or "kept") != reason:
                continue
            for rec in recs[:n]:
                path, pos = where(rec.get("key"), manifest)
                out.append({"stage": st, "fate": fate, "reason": why, "file": path,
                            "line": pos, **{k: v for k, v in rec.items() if k != "p"}})
    if reason is not None and not out:
        raise OutputError(f"no sample with reason {reason!r}"
                          + (f" at stage {stage!r}" if stage else "")
                          + f"; reasons: {', '.join(sorted(reasons_seen))}")
    return out


def format_samples(records: list[dict[str, Any]], n: int, width: int = 400) -> list[str]:
    """Readable lines for ``sample_records``' output."""
    lines = []
    if n > RECORDS_PER_GROUP:
        lines.append(f"(at most {RECORDS_PER_GROUP} records are kept per stage and fate; "
                     f"{n} asked)")
    last = None
    for r in records:
        group = (r["stage"], r["fate"], r["reason"])
        if group != last:
            fate = "kept" if r["fate"] == "kept" else f"dropped: {r['reason']}"
            lines.append(f"== {r['stage']} · {fate}")
            last = group
        unit = "row" if str(r["file"]).endswith(".parquet") else "line"
        head = f"-- id {r.get('id')}  {r['file']} {unit} {r['line']}"
        if r.get("detail"):
            head += f"  [{r['detail']}]"
        if r.get("scores"):
            head += "  " + " ".join(f"{k}={v}" for k, v in r["scores"].items())
        lines.append(head)
        text = (r.get("text") or "").replace("\n", " ⏎ ")
        more = "…" if len(text) > width or (r.get("chars") or 0) > len(r.get("text") or "") \
            else ""
        lines.append(f"   {text[:width]}{more}")
        if r.get("response"):
            lines.append(f"   response: {r['response'][:width]}")
    return lines


def timing_lines(manifest: dict[str, Any]) -> list[str]:
    stages = manifest.get("timings", {}).get("stages")
    if not stages:
        return []
    width = max(len(s["stage"]) for s in stages)
    lines = ["  time per stage (wall / CPU seconds summed over tasks; records/s per wall second):"]
    for s in stages:
        rate = s.get("records_per_s")
        lines.append(f"    {s['stage']:<{width}}  wall {s['wall_s']:>9,.3f}  "
                     f"CPU {s['cpu_s']:>9,.3f}"
                     + (f"  {rate:>12,.0f} rec/s" if rate is not None else ""))
    return lines


# ---------------------------------------------------------------------------
# diff

def _kept(out: Path, manifest: dict[str, Any]) -> pa.Table:
    """(file, line, id, text) of every distinct record in the output's shards."""
    tables = []
    for sh in manifest["shards"]:
        path = out / sh["path"]
        if path.suffix != ".parquet":
            raise OutputError(f"diff reads Parquet shards; {path} is not one")
        cols = [c for c in (ROW_KEY, "id", "text", "prompt") if c in pq.read_schema(path).names]
        if ROW_KEY not in cols:
            raise OutputError(f"{path} has no {ROW_KEY!r} column (written by an older "
                              "gristmill); records cannot be matched by input position")
        tables.append(pq.read_table(path, columns=cols))
    if not tables:
        return pa.table({ROW_KEY: pa.array([], pa.uint64())})
    return pa.concat_tables(tables, promote_options="default")


def _fates(out: Path, manifest: dict[str, Any]) -> dict[tuple[str, int], tuple[str, str]]:
    """(file, line) -> (stage, reason) of every drop listed in ``dropped/``."""
    fates = {}
    for f in manifest.get("dropped", []):
        t = pq.read_table(out / f, columns=[ROW_KEY, "stage", "reason"])
        for k, st, r in zip(t.column(ROW_KEY).to_pylist(), t.column("stage").to_pylist(),
                            t.column("reason").to_pylist(), strict=True):
            fates[where(k, manifest)] = (st, r)
    return fates


def diff_outputs(a: str | Path, b: str | Path, examples: int = 3) -> dict[str, Any]:
    """Which records run A kept and run B did not (and the reverse), by the
    stage and reason that dropped them in the other run.

    Records are matched by (input file, line or row). The reason is known where
    the other run wrote ``dropped/`` (``output.write_dropped``); elsewhere it is
    ``(not written)``, and a record the other run never read (other inputs) is
    ``(not read)``.
    """
    out_a, out_b = Path(a), Path(b)
    ma, _ = load_output(out_a)
    mb, _ = load_output(out_b)
    ka, kb = _kept(out_a, ma), _kept(out_b, mb)
    pos_a = {where(k, ma): i for i, k in enumerate(ka.column(ROW_KEY).to_pylist())}
    pos_b = {where(k, mb): i for i, k in enumerate(kb.column(ROW_KEY).to_pylist())}
    files_b = {f["path"] for f in mb.get("files", [])}
    files_a = {f["path"] for f in ma.get("files", [])}
    result: dict[str, Any] = {"a": str(out_a), "b": str(out_b),
                              "kept_by_both": len(pos_a.keys() & pos_b.keys())}
    for name, mine, other, table, other_out, other_m, other_files in (
            ("only_a", pos_a, pos_b, ka, out_b, mb, files_b),
            ("only_b", pos_b, pos_a, kb, out_a, ma, files_a)):
        fates = _fates(other_out, other_m)
        only = sorted(mine.keys() - other.keys())
        groups: Counter = Counter()
        shown: dict[str, list[dict[str, Any]]] = {}
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        tcol = "text" if "text" in table.column_names else (
            "prompt" if "prompt" in table.column_names else None)
        texts = table.column(tcol) if tcol else None
        for fl in only:
            if fl[0] not in other_files:
                st, r = "(not read)", "(not read)"
            else:
                st, r = fates.get(fl, ("(not written)", "(not written)"))
            label = f"{st}: {r}"
            groups[label] += 1
            if len(shown.setdefault(label, [])) < examples:
                i = mine[fl]
                text = texts[i].as_py() if texts is not None else None
                shown[label].append({"file": fl[0], "line": fl[1],
                                     "id": ids[i] if ids else None,
                                     "text": None if text is None else text[:300]})
        result[name] = {"count": len(only),
                        "by_stage_reason": dict(groups.most_common()),
                        "examples": shown}
    result["stages"] = _stage_table(ma, mb)
    return result


def _stage_table(ma: dict[str, Any], mb: dict[str, Any]) -> list[dict[str, Any]]:
    sa = {s["stage"]: s for s in ma["counts"]["stages"]}
    sb = {s["stage"]: s for s in mb["counts"]["stages"]}
    names = list(sa) + [s for s in sb if s not in sa]
    return [{"stage": n, "kept_a": sa.get(n, {}).get("kept"), "kept_b": sb.get(n, {}).get("kept"),
             "dropped_a": sa.get(n, {}).get("dropped"), "dropped_b": sb.get(n, {}).get("dropped")}
            for n in names]


def format_diff(d: dict[str, Any]) -> list[str]:
    lines = [f"A = {d['a']}", f"B = {d['b']}",
             f"kept by both: {d['kept_by_both']:,}   only by A: {d['only_a']['count']:,}   "
             f"only by B: {d['only_b']['count']:,}"]
    for name, other in (("only_a", "B"), ("only_b", "A")):
        part = d[name]
        if not part["count"]:
            continue
        lines.append(f"kept only by {'A' if name == 'only_a' else 'B'}, by what dropped them "
                     f"in {other}:")
        for label, n in part["by_stage_reason"].items():
            lines.append(f"  {label:<40} {n:>9,}")
            for ex in part["examples"].get(label, []):
                text = (ex.get("text") or "").replace("\n", " ⏎ ")[:120]
                lines.append(f"      id {ex['id']}  {ex['file']}:{ex['line']}  {text}")
    lines.append("per stage (kept A / kept B):")
    for s in d["stages"]:
        lines.append(f"  {s['stage']:<24} {s['kept_a'] if s['kept_a'] is not None else '-':>10}"
                     f" / {s['kept_b'] if s['kept_b'] is not None else '-':<10}")
    return lines
