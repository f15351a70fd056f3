"""The run report: ``report.html`` with embedded PNG plots, from ``stats.json``.

Plots: the funnel (rows kept after each stage, drops by reason), text-length
histograms before and after, and domain shares (by characters) before and after.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gristmill.pipeline.writers import atomic_write_bytes  # noqa: E402


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def funnel_plot(counts: dict[str, Any]) -> str:
    stages = counts["stages"]
    labels = ["read"] + [s["stage"] for s in stages]
    kept = [counts["read"] - counts["rejected"]] + [None] * len(stages)
    cur = kept[0]
    for i, s in enumerate(stages):
        cur = cur - s["dropped"] + s.get("added", 0)
        kept[i + 1] = cur
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(labels)))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, kept, color="#4c72b0", label="rows remaining")
    drops = [counts["rejected"]] + [s["dropped"] for s in stages]
    ax.barh(y, drops, left=kept, color="#dd8452", label="rejected / dropped here")
    ax.set_yticks(y, labels)
    ax.set_xlabel("records")
    ax.set_title("Funnel")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def length_plot(stats: dict[str, Any]) -> str | None:
    bins = np.asarray(stats["length_bins"], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    drawn = False
    for where, color in (("in", "#999999"), ("out", "#4c72b0")):
        h = stats.get(f"length_hist_{where}")
        if h is None:
            continue
        h = np.asarray(h, dtype=float)
        edges = np.append(np.maximum(bins, 1), bins[-1] * 1.4)
        ax.stairs(h, edges, label="before" if where == "in" else "after", color=color,
                  fill=where == "out", alpha=0.6 if where == "out" else 1.0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    nonzero = [i for where in ("in", "out") if stats.get(f"length_hist_{where}") is not None
               for i, v in enumerate(stats[f"length_hist_{where}"]) if v]
    if nonzero:
        ax.set_xlim(1, max(bins[max(nonzero) + 1] if max(nonzero) + 1 < len(bins)
                           else bins[-1], 10))
    ax.set_xlabel("characters per record")
    ax.set_ylabel("records")
    ax.set_title("Length before and after")
    ax.legend()
    return _png(fig)


def domain_plot(stats: dict[str, Any]) -> str | None:
    din, dout = stats.get("domains_in") or {}, stats.get("domains_out") or {}
    names = sorted(set(din) | set(dout))
    if not names:
        return None
    tin = sum(v[1] for v in din.values()) or 1
    tout = sum(v[1] for v in dout.values()) or 1
    before = [din.get(n, [0, 0])[1] / tin for n in names]
    after = [dout.get(n, [0, 0])[1] / tout for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.4 * len(names)))
    y = np.arange(len(names))
    ax.barh(y - 0.2, before, height=0.4, color="#999999", label="before")
    ax.barh(y + 0.2, after, height=0.4, color="#4c72b0", label="after")
    ax.set_yticks(y, names)
    ax.set_xlabel("share of characters")
    ax.set_title("Domain mixture before and after")
    ax.legend(fontsize=8)
    return _png(fig)


def write_report(out: Path, manifest: dict[str, Any], stats: dict[str, Any]) -> Path:
    c = manifest["counts"]
    rows = "".join(
        f"<tr><td>{html.escape(s['stage'])}</td><td>{html.escape(s['type'])}</td>"
        f"<td>{s['in']:,}</td><td>{s['kept']:,}</td><td>{s['dropped']:,}</td>"
        f"<td>{html.escape(', '.join(f'{r}: {n:,}' for r, n in s['dropped_by_reason'].items()))}"
        f"</td></tr>" for s in c["stages"])
    files = "".join(
        f"<tr><td>{html.escape(f['path'])}</td><td>{f.get('status')}</td>"
        f"<td>{f.get('records', 0):,}</td><td>{f.get('rejected', 0):,}</td>"
        f"<td>{html.escape(str(f.get('error') or ''))}</td></tr>" for f in manifest["files"])
    plots = [p for p in (funnel_plot(c), length_plot(stats), domain_plot(stats)) if p]
    imgs = "".join(f'<img src="data:image/png;base64,{p}"/>' for p in plots)
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    body = f"""<!doctype html><html><head><meta charset="utf-8">
<title>gristmill report: {html.escape(manifest['name'])}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
img{{display:block;margin:1em 0;max-width:100%}}</style></head><body>
<h1>gristmill run: {html.escape(manifest['name'])}</h1>
<p>read {c['read']:,} records; kept {c['kept']:,}; dropped {c['dropped']:,}; rejected
{c['rejected']:,}; counts {'reconcile' if c['reconciled'] else '<b>DO NOT reconcile</b>'}
(read + repeated = kept + dropped + rejected; {c.get('added', 0):,} repeated by a mixture). {len(manifest['shards'])} shard(s),
{total_bytes / 1e6:,.2f} MB. Recipe fingerprint <code>{manifest['fingerprint'][:16]}</code>.</p>
<h2>Stages</h2><table><tr><th>stage</th><th>type</th><th>in</th><th>kept</th><th>dropped</th>
<th>reasons</th></tr>{rows}</table>
{imgs}
<h2>Input files</h2><table><tr><th>file</th><th>status</th><th>records</th><th>rejected</th>
<th>error</th></tr>{files}</table>
</body></html>"""
    path = out / "report.html"
    atomic_write_bytes(path, body.encode())
    return path
