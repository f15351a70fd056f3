"""The run report: one self-contained ``report.html`` from the manifest,
``stats.json`` and the stages' artifacts.

It works offline: charts are inline SVG (``gristmill.pipeline.svg``), styles
are inline, there is no script, font or image fetched from anywhere. Sections:

- the funnel: records in, kept and dropped per stage, with every drop reason,
  in counts and percentages;
- time per stage: wall and CPU seconds (summed over tasks and workers) and
  records per second;
- score distributions: for every column a stage adds, the share of records
  per bin as scored and in the output, with the thresholds that a selecting
  stage (``top_fraction``'s published threshold, a comparison in a filter's
  parameters) used;
- stage views: GRAPE's winning response sources and score margins; a mixture's
  tokens per domain before and after, its weights and its schedule over
  training steps (Cooldown); near-duplicate clusters, the survivor beside a
  dropped member with the differing words marked;
- sample records per stage, kept and per drop reason, with id, input file and
  line (deterministic bottom-k samples, see ``gristmill.pipeline.observe``;
  text truncated and HTML-escaped, redacted where a ``pii`` stage redacts);
- text lengths and domain shares before and after, and the input files.
"""

from __future__ import annotations

import difflib
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from gristmill.pipeline import storage, svg
from gristmill.pipeline.stage import KEY_POS_BITS, KEY_POS_MASK
from gristmill.pipeline.writers import atomic_write_bytes

#: sample records shown per stage and group (all captured ones are in stats.json)
SHOWN_PER_GROUP = 5
HIST_BINS = 30
_CMP = re.compile(r"\b([A-Za-z_][\w.]*)\s*(>=|<=|>|<|==)\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1040px;
margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{border-bottom:2px solid #4c72b0;padding-bottom:2px;margin-top:1.8em}
h3{margin-bottom:.3em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.reason td{color:#555;background:#fafafa}tr.reason td:first-child{padding-left:2em}
.bar{display:inline-block;height:10px;background:#dd8452;vertical-align:middle}
.bar.kept{background:#4c72b0}
nav a{margin-right:1em}
.record{border:1px solid #ddd;border-radius:4px;margin:.5em 0;padding:.4em .6em;
background:#fcfcfc}.record header{font-size:12px;color:#555}
.record pre{white-space:pre-wrap;word-break:break-word;font-size:12px;margin:.3em 0;
max-height:16em;overflow:auto;background:#fff}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.6em}
mark.diff{background:#ffd27f}.note{color:#666;font-size:13px}
details>summary{cursor:pointer;font-weight:600;margin:.3em 0}
svg.chart{display:block;margin:.4em 0;max-width:100%;height:auto}
code{background:#f3f3f3;padding:0 3px}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(n: float, d: float) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "-"


def _read_artifact(out: Path, stage: str, name: str) -> Any:
    path = out / "artifacts" / stage / name
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _stage_names(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, type, parameters) of every stage of the recipe, in order."""
    out = []
    for s in manifest.get("recipe", {}).get("stages", []):
        params = {k: v for k, v in s.items() if k not in ("stage", "name")}
        out.append((s.get("name") or s["stage"], s["stage"], params))
    return out


# ---------------------------------------------------------------------------
# summary, funnel, time

def _summary(manifest: dict[str, Any]) -> str:
    c = manifest["counts"]
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    t = manifest.get("timings", {})
    ok = "reconcile" if c["reconciled"] else "<b>DO NOT reconcile</b>"
    return (f'<section id="summary"><p>Read {c["read"]:,} records; kept {c["kept"]:,}; '
            f'dropped {c["dropped"]:,}; rejected {c["rejected"]:,}; counts {ok} (read + '
            f'repeated = kept + dropped + rejected; {c.get("added", 0):,} repeated by a '
            f'mixture). {len(manifest["shards"])} shard(s), {total_bytes / 1e6:,.2f} MB. '
            f'Engine <code>{_e(t.get("engine", "?"))}</code> with {t.get("workers", "?")} '
            f'worker(s), {t.get("seconds", 0):,.1f} s. Recipe fingerprint '
            f'<code>{_e(manifest["fingerprint"][:16])}</code>.</p></section>')


def _funnel(manifest: dict[str, Any]) -> str:
    c = manifest["counts"]
    read = c["read"]
    rows = [f'<tr class="stage" data-stage="(read)"><td>read</td><td>reader</td>'
            f'<td class="n">{read:,}</td><td class="n">{read - c["rejected"]:,}</td>'
            f'<td class="n">{c["rejected"]:,}</td><td class="n">{_pct(c["rejected"], read)}</td>'
            f'<td class="n">{_pct(read - c["rejected"], read)}</td><td></td></tr>']
    labels, remaining = ["read"], [read - c["rejected"]]
    for s in c["stages"]:
        share = s["kept"] / read if read else 0
        bar = f'<span class="bar kept" style="width:{120 * min(share, 1.5):.0f}px"></span>'
        rows.append(
            f'<tr class="stage" data-stage="{_e(s["stage"])}"><td>{_e(s["stage"])}</td>'
            f'<td>{_e(s["type"])}</td><td class="n">{s["in"]:,}</td>'
            f'<td class="n">{s["kept"]:,}</td><td class="n">{s["dropped"]:,}</td>'
            f'<td class="n">{_pct(s["dropped"], s["in"])}</td>'
            f'<td class="n">{_pct(s["kept"], read)}</td><td>{bar}'
            + (f' repeated {s["added"]:,}' if s.get("added") else "") + "</td></tr>")
        for reason, n in sorted(s["dropped_by_reason"].items(), key=lambda kv: -kv[1]):
            width = 120 * n / s["in"] if s["in"] else 0
            rows.append(
                f'<tr class="reason" data-stage="{_e(s["stage"])}" data-reason="{_e(reason)}">'
                f'<td>{_e(reason)}</td><td></td><td></td><td></td><td class="n">{n:,}</td>'
                f'<td class="n">{_pct(n, s["in"])}</td><td></td>'
                f'<td><span class="bar" style="width:{width:.0f}px"></span></td></tr>')
        labels.append(s["stage"])
        remaining.append(s["kept"])
    chart = svg.hbars(labels, [("records remaining", remaining, svg.PALETTE[0])],
                      "records remaining after each stage", fmt=lambda v: f"{v:,.0f}")
    return ('<section id="funnel"><h2>Funnel</h2><p class="note">Drops per stage and reason; '
            '"% of in" is of the records that reached the stage, "% of read" of all records '
            'read.</p><table><tr><th>stage / reason</th><th>type</th><th class="n">in</th>'
            '<th class="n">kept</th><th class="n">dropped</th><th class="n">% of in</th>'
            '<th class="n">kept, % of read</th><th></th></tr>'
            + "".join(rows) + "</table>" + chart + "</section>")


def _timing(manifest: dict[str, Any]) -> str:
    stages = manifest.get("timings", {}).get("stages")
    if not stages:
        return ('<section id="timing"><h2>Time per stage</h2><p class="note">This output has '
                'no per-stage timings (written by an older gristmill).</p></section>')
    rows = []
    for s in stages:
        rate = s.get("records_per_s")
        n_in = "" if s.get("records_in") is None else f"{s['records_in']:,}"
        phases = ", ".join(f"{p} {w:,.2f}s" for p, (w, _) in s["phases"].items())
        rows.append(f'<tr data-stage="{_e(s["stage"])}"><td>{_e(s["stage"])}</td>'
                    f'<td class="n">{s["wall_s"]:,.3f}</td><td class="n">{s["cpu_s"]:,.3f}</td>'
                    f'<td class="n">{n_in}</td><td class="n">{"" if rate is None else f"{rate:,.0f}"}</td>'
                    f"<td>{_e(phases)}</td></tr>")
    chart = svg.hbars([s["stage"] for s in stages],
                      [("wall s", [s["wall_s"] for s in stages], svg.PALETTE[0]),
                       ("CPU s", [s["cpu_s"] for s in stages], svg.PALETTE[1])],
                      "seconds per stage", fmt=lambda v: f"{v:,.2f}")
    return ('<section id="timing"><h2>Time per stage</h2><p class="note">Wall and CPU seconds '
            'summed over tasks and workers (so wall can exceed the run\'s elapsed time); '
            'records/s is records in per wall second. <code>read</code>, <code>spill</code> and '
            '<code>write</code> are the readers, the files between segments and the shard '
            'writer; <code>(observe)</code> is what collecting this report cost.</p><table>'
            '<tr><th>stage</th><th class="n">wall s</th><th class="n">CPU s</th>'
            '<th class="n">records in</th><th class="n">records/s</th><th>phases (wall)</th></tr>'
            + "".join(rows) + "</table>" + chart + "</section>")


# ---------------------------------------------------------------------------
# score distributions

def thresholds(manifest: dict[str, Any], out: Path) -> dict[str, list[tuple[float, str]]]:
    """Per column, the cut points the recipe's selecting stages used.

    ``top_fraction`` (and any stage with a ``column`` parameter that publishes
    ``threshold.json``): the published threshold; numeric ``min``/``max``/
    ``threshold`` parameters beside a ``column``; comparisons
    ``column <op> number`` in any string parameter (a filter expression).
    """
    found: dict[str, list[tuple[float, str]]] = {}
    for name, _type, params in _stage_names(manifest):
        col = params.get("column")
        if isinstance(col, str):
            art = _read_artifact(out, name, "threshold.json")
            if art is not None and art.get("threshold") is not None and \
                    math.isfinite(art["threshold"]):
                found.setdefault(col, []).append((float(art["threshold"]), f"{name}"))
            for key in ("min", "max", "threshold", "min_value", "max_value"):
                v = params.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    found.setdefault(col, []).append((float(v), f"{name}.{key}"))
        for v in params.values():
            if isinstance(v, str):
                for c, op, num in _CMP.findall(v):
                    found.setdefault(c, []).append((float(num), f"{name}: {op} {num}"))
    return found


def _bins(values: list[np.ndarray], lines: list[float]) -> tuple[np.ndarray, bool]:
    allv = np.concatenate([v for v in values if v.size] or [np.zeros(1)])
    lo, hi = float(allv.min()), float(allv.max())
    inside = [x for x in lines if math.isfinite(x)]
    if inside and hi > lo:
        span = hi - lo
        inside = [x for x in inside if lo - span <= x <= hi + span]
    lo, hi = min([lo, *inside]), max([hi, *inside])
    log = lo > 0 and hi / lo > 50
    if np.all(allv == np.round(allv)) and hi - lo <= HIST_BINS and not log:
        return np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 1.0, 1.0), False
    if hi <= lo:
        hi = lo + 1
    if log:
        return np.geomspace(lo, hi, HIST_BINS + 1), True
    return np.linspace(lo, hi, HIST_BINS + 1), False


def _values(sample: dict[str, list] | None) -> np.ndarray:
    """The values of a score sample (``observe``: priorities ``p``, values ``v``)."""
    return np.asarray((sample or {}).get("v", []), dtype=np.float64)


def _distribution(col: str, d: dict[str, Any], lines: list[tuple[float, str]],
                  counts: dict[str, int]) -> str:
    scored, kept = _values(d.get("scored")), _values(d.get("kept"))
    if scored.size == 0 and kept.size == 0:
        return ""
    edges, log = _bins([scored, kept], [v for v, _ in lines])
    series = []
    for label, vals, color in ((f"as scored ({counts.get('scored', 0):,})", scored, svg.GREY),
                               (f"in the output ({counts.get('kept', 0):,})", kept,
                                svg.PALETTE[0])):
        if vals.size:
            h = np.histogram(np.clip(vals, edges[0], edges[-1]), bins=edges)[0]
            series.append((label, (h / vals.size).tolist(), color))
    chart = svg.histogram(edges.tolist(), series, f"distribution of {col}",
                          f"{col}{' (log scale)' if log else ''}; share of records per bin",
                          lines=[(v, f"{lab} = {v:.4g}") for v, lab in lines], log_x=log)

    def q(v: np.ndarray) -> str:
        if not v.size:
            return "-"
        a, m, b = np.quantile(v, [0.1, 0.5, 0.9])
        return f"{a:.4g} / {m:.4g} / {b:.4g}"

    return (f'<figure class="distribution" data-column="{_e(col)}" '
            f'data-stage="{_e(d.get("stage") or "")}"><h3>{_e(col)} <span class="note">'
            f'(added by {_e(d.get("stage") or "?")})</span></h3>{chart}<figcaption class="note">'
            f"10th / 50th / 90th percentile as scored: {q(scored)}; in the output: {q(kept)}. "
            f"Shares of a deterministic sample of up to {max(scored.size, kept.size):,} "
            f"records per curve.</figcaption></figure>")


def _categories(col: str, d: dict[str, Any]) -> str:
    sc, kp = d.get("scored") or {}, d.get("kept") or {}
    if sc.get("free_text") or kp.get("free_text") or not (sc or kp):
        return ""
    names = sorted(set(sc) | set(kp), key=lambda k: -(kp.get(k, 0) + sc.get(k, 0)))
    ts, tk = sum(sc.values()) or 1, sum(kp.values()) or 1
    chart = svg.hbars(names, [("as scored", [sc.get(n, 0) / ts for n in names], svg.GREY),
                              ("in the output", [kp.get(n, 0) / tk for n in names],
                               svg.PALETTE[0])],
                      f"values of {col}", fmt=lambda v: f"{100 * v:.1f}%")
    rows = "".join(f'<tr data-value="{_e(n)}"><td>{_e(n)}</td><td class="n">{sc.get(n, 0):,}'
                   f'</td><td class="n">{_pct(sc.get(n, 0), ts)}</td><td class="n">'
                   f'{kp.get(n, 0):,}</td><td class="n">{_pct(kp.get(n, 0), tk)}</td></tr>'
                   for n in names)
    return (f'<figure class="categories" data-column="{_e(col)}"><h3>{_e(col)}</h3>'
            f'<table><tr><th>value</th><th class="n">as scored</th><th class="n">share</th>'
            f'<th class="n">in the output</th><th class="n">share</th></tr>{rows}</table>'
            f"{chart}</figure>")


def _point_counts(manifest: dict[str, Any], stage: str | None) -> dict[str, int]:
    c = manifest["counts"]
    scored = next((s["kept"] for s in c["stages"] if s["stage"] == stage), 0)
    return {"scored": scored, "kept": c["kept"]}


def _scores(manifest: dict[str, Any], stats: dict[str, Any], out: Path) -> str:
    cols = stats.get("columns") or {}
    lines = thresholds(manifest, out)
    mixes = {name for name, typ, _ in _stage_names(manifest) if typ == "mix"}
    parts = []
    for col, d in cols.items():
        if d.get("stage") in mixes:
            continue  # the copies a mixture made: shown with the mixture
        if d.get("kind") == "numeric" and d.get("scored"):
            parts.append(_distribution(col, d, lines.get(col, []),
                                       _point_counts(manifest, d.get("stage"))))
        elif d.get("kind") == "category" and d.get("scored"):
            parts.append(_categories(col, d))
    parts = [p for p in parts if p]
    if not parts:
        body = '<p class="note">No stage of this recipe adds a score column.</p>'
    else:
        body = ('<p class="note">Every column a stage adds: the share of records per bin as the '
                'stage scored them (grey) and in the written output (blue), each normalised '
                'to 1, with the thresholds selecting stages used (red).</p>' + "".join(parts))
    return f'<section id="scores"><h2>Score distributions</h2>{body}</section>'


# ---------------------------------------------------------------------------
# stage views: GRAPE, mixtures, near duplicates

def _grape(manifest: dict[str, Any], stats: dict[str, Any]) -> str:
    cols = stats.get("columns") or {}
    parts = []
    for name, typ, _ in _stage_names(manifest):
        if typ != "grape":
            continue
        src = cols.get(f"{name}_source", {})
        won = src.get("kept") or src.get("scored") or {}
        body = []
        if won and not won.get("free_text"):
            total = sum(won.values()) or 1
            names = sorted(won, key=lambda k: -won[k])
            rows = "".join(f'<tr data-source="{_e(n)}"><td>{_e(n)}</td><td class="n">'
                           f'{won[n]:,}</td><td class="n">{_pct(won[n], total)}</td></tr>'
                           for n in names)
            body.append('<table class="winners"><tr><th>response source</th>'
                        '<th class="n">instructions won</th><th class="n">share</th></tr>'
                        f"{rows}</table>")
            body.append(svg.hbars(names, [("share won", [won[n] / total for n in names],
                                           svg.PALETTE[2])], f"{name}: winning sources",
                                  fmt=lambda v: f"{100 * v:.1f}%"))
        else:
            body.append('<p class="note">No response sources recorded (the input has no '
                        '<code>response_sources</code>).</p>')
        margin = cols.get(f"{name}_margin")
        if margin and (margin.get("scored") or margin.get("kept")):
            vals = _values(margin.get("kept") or margin.get("scored"))
            if vals.size:
                edges = np.linspace(0, max(float(vals.max()), 1e-6), HIST_BINS + 1)
                h = np.histogram(vals, bins=edges)[0] / vals.size
                body.append(f'<div class="margins" data-stage="{_e(name)}">' + svg.histogram(
                    edges.tolist(), [("instructions", h.tolist(), svg.PALETTE[2])],
                    f"{name}: score margin", "best minus second-best score (per token log-"
                    "likelihood); share of instructions") + '<p class="note">Median margin '
                    f"{np.median(vals):.4g}; {np.mean(vals < 0.05):.1%} of instructions were "
                    "decided by less than 0.05.</p></div>")
        parts.append(f'<div class="grape" data-stage="{_e(name)}"><h3>{_e(name)}</h3>'
                     + "".join(body) + "</div>")
    if not parts:
        return ""
    return ('<section id="grape"><h2>GRAPE: which responses won</h2><p class="note">Share of '
            "instructions whose kept response came from each source, and how far the winner's "
            "score was ahead of the runner-up.</p>" + "".join(parts) + "</section>")


def _mixtures(manifest: dict[str, Any], out: Path) -> str:
    parts = []
    for name, typ, _ in _stage_names(manifest):
        mix = _read_artifact(out, name, "mixture.json")
        if typ != "mix" or mix is None:
            continue
        doms = mix["domains"]
        names = sorted(doms)
        natural = dict(zip(names, mix.get("natural") or [0] * len(names), strict=False))
        rows = "".join(
            f'<tr data-domain="{_e(d)}"><td>{_e(d)}</td><td class="n">'
            f'{doms[d]["tokens_before"]:,}</td><td class="n">{doms[d]["tokens_after"]:,}</td>'
            f'<td class="n">{natural.get(d, 0):.3f}</td><td class="n">{doms[d]["weight"]:.3f}'
            f'</td><td class="n">{doms[d]["epochs"]:.2f}</td></tr>' for d in names)
        body = [f'<table class="mixture"><tr><th>domain</th><th class="n">tokens before</th>'
                f'<th class="n">tokens after</th><th class="n">natural share q</th>'
                f'<th class="n">weight p</th><th class="n">epochs</th></tr>{rows}</table>',
                svg.hbars(names, [("tokens before", [doms[d]["tokens_before"] for d in names],
                                   svg.GREY),
                                  ("tokens after", [doms[d]["tokens_after"] for d in names],
                                   svg.PALETTE[0])],
                          f"{name}: tokens per domain", fmt=lambda v: f"{v:,.0f}")]
        sched = _read_artifact(out, name, "schedule.json")
        if sched is not None:
            segs = sched["segments"]
            steps = [s["start_step"] for s in segs]
            series = [(d, [s["weights"][j] for s in segs], svg.PALETTE[j % len(svg.PALETTE)])
                      for j, d in enumerate(sched["domains"])]
            if len(steps) == 1:
                steps = [0, sched["total_steps"]]
                series = [(d, v * 2, c) for d, v, c in series]
            meta = sched.get("meta", {})
            body.append(f'<div class="schedule" data-stage="{_e(name)}" '
                        f'data-segments="{len(segs)}">' + svg.lines_chart(
                            steps, series, f"{name}: mixture schedule", "training step",
                            "domain probability") + f'<p class="note">Method '
                        f'<code>{_e(meta.get("method", mix.get("sampler")))}</code>, '
                        f'{len(segs)} segment(s) over {sched["total_steps"]:,} steps'
                        + (f', temperature {meta["t_start"]} to {meta["t_end"]} '
                           f'({_e(meta.get("shape"))})' if "t_start" in meta else "")
                        + (f'; loss weights {_e(sched["loss_weights"])}'
                           if sched.get("loss_weights") else "") + ".</p></div>")
        parts.append(f'<div class="mix" data-stage="{_e(name)}"><h3>{_e(name)} '
                     f'<span class="note">(sampler {_e(mix.get("sampler"))}, budget '
                     f'{mix.get("budget_tokens", 0):,} tokens)</span></h3>' + "".join(body)
                     + "</div>")
    if not parts:
        return ""
    return '<section id="mixtures"><h2>Mixtures</h2>' + "".join(parts) + "</section>"


_TOKEN = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def diff_words(a: str, b: str) -> tuple[str, str]:
    """HTML of ``a`` and ``b`` with the words that differ marked (``<mark>``)."""
    ta, tb = _TOKEN.findall(a), _TOKEN.findall(b)
    sm = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    oa: list[str] = []
    ob: list[str] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        for toks, i, j, dst in ((ta, i1, i2, oa), (tb, j1, j2, ob)):
            for t in toks[i:j]:
                # whitespace is shown, never marked: re-indented text differs in no word
                dst.append(_e(t) if op == "equal" or t.isspace()
                           else f'<mark class="diff">{_e(t)}</mark>')
    return "".join(oa), "".join(ob)


def _clusters(manifest: dict[str, Any], stats: dict[str, Any]) -> str:
    parts = []
    for stage, clusters in (stats.get("clusters") or {}).items():
        pairs = []
        for _, c in sorted(clusters.items(), key=lambda kv: kv[1]["p"]):
            s, m = c.get("survivor"), c.get("member")
            if not s or not m:
                continue
            ha, hb = diff_words(s.get("text") or "", m.get("text") or "")
            pairs.append(
                f'<div class="pair" data-stage="{_e(stage)}">'
                f'<div class="record survivor">{_record_header(s, manifest, "survivor (kept)")}'
                f"<pre>{ha}{_ellipsis(s)}</pre></div>"
                f'<div class="record member">{_record_header(m, manifest, "dropped member")}'
                f"<pre>{hb}{_ellipsis(m)}</pre></div></div>")
        if pairs:
            parts.append(f'<h3>{_e(stage)}</h3>' + "".join(pairs))
    if not parts:
        return ""
    return ('<section id="clusters"><h2>Near-duplicate clusters</h2><p class="note">A few '
            "clusters (chosen by a hash of the survivor, so the same ones on every engine): "
            "the survivor beside a dropped member, words that differ marked.</p>"
            + "".join(parts) + "</section>")


# ---------------------------------------------------------------------------
# sample records

def file_and_line(key: int | None, manifest: dict[str, Any]) -> tuple[str, str]:
    """(input file, "line N" / "row N") of a row key, from the manifest's file list."""
    if key is None:
        return "?", "?"
    index, pos = int(key) >> KEY_POS_BITS, int(key) & KEY_POS_MASK
    files = manifest.get("files", [])
    entry = next((f for f in files if f.get("index") == index), None)
    if entry is None and index < len(files):
        entry = files[index]
    path = entry.get("path", "?") if entry else f"file #{index}"
    unit = "row" if str(path).endswith(".parquet") else "line"
    return path, f"{unit} {pos}"


def _ellipsis(rec: dict[str, Any]) -> str:
    text, chars = rec.get("text") or "", rec.get("chars") or 0
    return f'<span class="note"> … ({chars:,} characters in all)</span>' \
        if chars > len(text) else ""


def _record_header(rec: dict[str, Any], manifest: dict[str, Any], role: str = "") -> str:
    path, line = file_and_line(rec.get("key"), manifest)
    bits = [f"<b>{_e(role)}</b>"] if role else []
    bits.append(f'id <code class="rid">{_e(rec.get("id"))}</code>')
    bits.append(f'<span class="where">{_e(path)}, {_e(line)}</span>')
    if rec.get("domain"):
        bits.append(f"domain {_e(rec['domain'])}")
    if rec.get("detail"):
        bits.append(f"detail <code>{_e(rec['detail'])}</code>")
    scores = rec.get("scores") or {}
    if scores:
        bits.append(", ".join(f"{_e(k)}={_e(v)}" for k, v in scores.items()))
    return "<header>" + " · ".join(bits) + "</header>"


def _record(rec: dict[str, Any], manifest: dict[str, Any]) -> str:
    extra = ""
    if rec.get("response") is not None:
        extra += f'<pre class="response"><b>response:</b> {_e(rec["response"])}</pre>'
    elif rec.get("responses"):
        extra += "".join(f'<pre class="response"><b>candidate {i}:</b> {_e(r)}</pre>'
                         for i, r in enumerate(rec["responses"]))
    return (f'<article class="record" data-key="{_e(rec.get("key"))}">'
            f"{_record_header(rec, manifest)}"
            f'<pre class="text">{_e(rec.get("text") or "")}{_ellipsis(rec)}</pre>{extra}'
            f"</article>")


def _samples(manifest: dict[str, Any], stats: dict[str, Any]) -> str:
    samples = stats.get("samples") or {}
    order = [s["stage"] for s in manifest["counts"]["stages"]]
    parts = []
    for stage in [s for s in order if s in samples] + [s for s in samples if s not in order]:
        groups = samples[stage]
        opened = len(parts) < 2  # the first groups of the first stages start unfolded
        blocks = []
        for reason, recs in sorted(groups.get("dropped", {}).items()):
            blocks.append(f'<details class="sample"{" open" if opened and not blocks else ""} '
                          f'data-stage="{_e(stage)}" '
                          f'data-fate="dropped" data-reason="{_e(reason)}"><summary>dropped: '
                          f'{_e(reason)} ({min(len(recs), SHOWN_PER_GROUP)} shown)</summary>'
                          + "".join(_record(r, manifest) for r in recs[:SHOWN_PER_GROUP])
                          + "</details>")
        kept = groups.get("kept", [])
        if kept:
            blocks.append(f'<details class="sample"{" open" if opened and not blocks else ""} '
                          f'data-stage="{_e(stage)}" data-fate="kept">'
                          f"<summary>kept ({min(len(kept), SHOWN_PER_GROUP)} shown)</summary>"
                          + "".join(_record(r, manifest) for r in kept[:SHOWN_PER_GROUP])
                          + "</details>")
        parts.append(f'<h3>{_e(stage)}</h3>' + "".join(blocks))
    if not parts:
        return ""
    return ('<section id="samples"><h2>Sample records</h2><p class="note">Per stage, records it '
            "dropped (per reason, as they entered the stage) and kept (as they left it); the "
            "same records on every engine and worker count (smallest hash of the seed and "
            "row key). Text is truncated; where the recipe has a <code>pii</code> stage, every "
            "sample shows the redacted text. <code>gristmill inspect OUT --sample N</code> "
            "prints them.</p>" + "".join(parts) + "</section>")


# ---------------------------------------------------------------------------
# lengths, domains, files

def _lengths(stats: dict[str, Any]) -> str:
    bins = stats.get("length_bins")
    hin, hout = stats.get("length_hist_in"), stats.get("length_hist_out")
    if not bins or (hin is None and hout is None):
        return ""
    edges = np.append(np.maximum(np.asarray(bins, dtype=float), 1), bins[-1] * 1.4)
    used = [i for h in (hin, hout) if h is not None for i, v in enumerate(h) if v]
    lo, hi = (min(used), max(used) + 1) if used else (0, len(bins))
    series = []
    for label, h, color in (("read", hin, svg.GREY), ("written", hout, svg.PALETTE[0])):
        if h is not None:
            h = np.asarray(h, dtype=float)
            series.append((f"{label} ({int(h.sum()):,})", (h[lo:hi] / max(h.sum(), 1)).tolist(),
                           color))
    chart = svg.histogram(edges[lo:hi + 1].tolist(), series, "text length before and after",
                          "characters per record (log scale); share of records", log_x=True)
    return f'<section id="lengths"><h2>Text length</h2>{chart}</section>'


def _domains(stats: dict[str, Any]) -> str:
    din, dout = stats.get("domains_in") or {}, stats.get("domains_out") or {}
    names = sorted(set(din) | set(dout))
    if not names:
        return ""
    tin = sum(v[1] for v in din.values()) or 1
    tout = sum(v[1] for v in dout.values()) or 1
    chart = svg.hbars(names, [("read", [din.get(n, [0, 0])[1] / tin for n in names], svg.GREY),
                              ("written", [dout.get(n, [0, 0])[1] / tout for n in names],
                               svg.PALETTE[0])],
                      "share of characters per domain", fmt=lambda v: f"{100 * v:.1f}%")
    return f'<section id="domains"><h2>Domains (share of characters)</h2>{chart}</section>'


def _ids(manifest: dict[str, Any]) -> str:
    """Repeated user ids: counted, never used to drop (records are tracked by ``_key``)."""
    ids = manifest.get("ids")
    if not ids:
        return ""
    head = (f'<p class="note">Records are identified by their input file and line, never by '
            f'their <code>id</code>. {ids.get("distinct_ids", 0):,} distinct ids; '
            f'{ids.get("repeated_ids", 0):,} of them occur on more than one record '
            f'({ids.get("records_with_repeated_id", 0):,} records).</p>')
    rows = "".join(f"<tr><td><code>{_e(e['id'])}</code></td><td class='n'>{e['count']:,}</td>"
                   f"<td>{_e(', '.join(e['at']))}</td></tr>" for e in ids.get("examples", []))
    table = ('<table><tr><th>id</th><th class="n">records</th><th>first places (file:line)'
             f'</th></tr>{rows}</table>') if rows else ""
    return f'<section id="ids"><h2>Repeated ids</h2>{head}{table}</section>'


def _files(manifest: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(f['path'])}</td><td>{_e(f.get('status'))}</td>"
        f"<td class='n'>{f.get('records', 0):,}</td><td class='n'>{f.get('rejected', 0):,}</td>"
        f"<td class='n'>{f.get('size', 0):,}</td><td><code>{_e(f.get('xxh3_128', ''))}</code>"
        f"</td><td>{_e(f.get('error') or '')}</td></tr>" for f in manifest["files"])
    return ('<section id="files"><h2>Input files</h2><p class="note">Size and xxh3_128 hash '
            'of every input as it was read: a re-run or resume on changed inputs refuses and '
            'names them (unless <code>--fresh</code>).</p><table><tr><th>file</th>'
            '<th>status</th><th class="n">records</th><th class="n">rejected</th>'
            '<th class="n">bytes</th><th>xxh3_128</th><th>error</th></tr>'
            f"{rows}</table></section>")


def render_report(out: Path, manifest: dict[str, Any], stats: dict[str, Any]) -> str:
    """The report's HTML (see the module docstring)."""
    sections = [_summary(manifest), _funnel(manifest), _timing(manifest),
                _scores(manifest, stats, out), _grape(manifest, stats), _mixtures(manifest, out),
                _clusters(manifest, stats), _samples(manifest, stats), _lengths(stats),
                _domains(stats), _ids(manifest), _files(manifest)]
    sections = [s for s in sections if s]
    nav = " ".join(f'<a href="#{m}">{m}</a>' for m in re.findall(r'<section id="([\w-]+)"',
                                                                    "".join(sections))
                   if m != "summary")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>gristmill report: {_e(manifest['name'])}</title><style>{CSS}</style>"
            f"</head><body><h1>gristmill run: {_e(manifest['name'])}</h1><nav>{nav}</nav>"
            + "".join(sections) + "</body></html>")


def write_report(out: Path, manifest: dict[str, Any], stats: dict[str, Any]) -> Path:
    """Write ``out/report.html`` atomically and return its path."""
    out = storage.as_path(out)
    path = out / "report.html"
    atomic_write_bytes(path, render_report(out, manifest, stats).encode())
    return path
