"""Small inline SVG charts for the run report: no plotting library, no scripts,
no external resources, a few kilobytes each.

Every function returns an ``<svg>`` element as a string; labels are
HTML-escaped here, numbers are formatted by the caller's ``fmt``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
           "#8c8c8c", "#ccb974", "#64b5cd")
GREY = "#9a9a9a"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.2g}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (f'<svg class="chart" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'
            f"<title>{_e(title)}</title>{body}</svg>")


def hbars(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]],
          title: str, fmt: Callable[[float], str] = _num, width: int = 720) -> str:
    """Horizontal bars, one group per label, one bar per series, value labels."""
    n, k = len(labels), max(len(series), 1)
    bar, gap = 14, 8
    left = min(220, 12 + 7 * max((len(str(lb)) for lb in labels), default=4))
    top = 22 if k > 1 else 6
    height = top + n * (k * bar + gap) + 6
    vmax = max((v for _, vals, _ in series for v in vals), default=0) or 1
    plot = width - left - 80
    parts = []
    for j, (name, _, color) in enumerate(series if k > 1 else []):
        parts.append(f'<rect x="{left + j * 120}" y="4" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + j * 120 + 14}" y="13">{_e(name)}</text>')
    for i, label in enumerate(labels):
        y0 = top + i * (k * bar + gap)
        parts.append(f'<text x="{left - 6}" y="{y0 + k * bar / 2 + 4}" '
                     f'text-anchor="end">{_e(label)}</text>')
        for j, (_, vals, color) in enumerate(series):
            v = float(vals[i])
            w = max(0.0, plot * v / vmax)
            y = y0 + j * bar
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" '
                         f'fill="{color}"><title>{_e(label)}: {_e(fmt(v))}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + bar - 4}">{_e(fmt(v))}</text>')
    return _svg(width, height, "".join(parts), title)


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, (b - a) // n)
        return [10.0 ** e for e in range(a, b + 1, step) if lo <= 10.0 ** e <= hi]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def histogram(edges: Sequence[float], series: Sequence[tuple[str, Sequence[float], str]],
              title: str, xlabel: str, lines: Sequence[tuple[float, str]] = (),
              log_x: bool = False, width: int = 720, height: int = 240) -> str:
    """Step histograms on shared bins (values are shares, drawn as given), with
    labelled vertical lines (thresholds)."""
    left, right, top, bottom = 52, 16, 24, 40
    pw, ph = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    if log_x:
        lo, hi = max(lo, 1e-12), max(hi, lo * 10)

    def x_of(v: float) -> float:
        if log_x:
            v = max(v, lo)
            f = (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        else:
            f = (v - lo) / ((hi - lo) or 1)
        return left + pw * min(max(f, 0.0), 1.0)

    ymax = max((v for _, vals, _ in series for v in vals), default=0) or 1
    parts = [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
             f'stroke="#444"/><line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" '
             f'stroke="#444"/>']
    for t in _ticks(lo, hi, log_x):
        x = x_of(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" '
                     f'stroke="#444"/><text x="{x:.1f}" y="{top + ph + 15}" '
                     f'text-anchor="middle">{_e(_num(t))}</text>')
    for frac in (0.5, 1.0):
        y = top + ph * (1 - frac)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{_e(_num(ymax * frac))}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">'
                 f'{_e(xlabel)}</text>')
    for j, (name, vals, color) in enumerate(series):
        pts = []
        for i, v in enumerate(vals):
            y = top + ph * (1 - float(v) / ymax)
            pts += [f"{x_of(edges[i]):.1f},{y:.1f}", f"{x_of(edges[i + 1]):.1f},{y:.1f}"]
        base = f"{x_of(edges[0]):.1f},{top + ph} "
        end = f" {x_of(edges[-1]):.1f},{top + ph}"
        fill = f'fill="{color}" fill-opacity="0.35"' if j > 0 else 'fill="none"'
        parts.append(f'<polyline class="series" data-series="{_e(name)}" '
                     f'points="{base}{" ".join(pts)}{end}" {fill} stroke="{color}" '
                     f'stroke-width="1.5"/>')
        parts.append(f'<rect x="{left + 8 + j * 130}" y="6" width="10" height="10" '
                     f'fill="{color}"/><text x="{left + 22 + j * 130}" y="15">{_e(name)}</text>')
    for v, label in lines:
        x = x_of(v)
        parts.append(f'<g class="threshold" data-value="{v!r}"><line x1="{x:.1f}" y1="{top}" '
                     f'x2="{x:.1f}" y2="{top + ph}" stroke="#c44e52" stroke-width="2" '
                     f'stroke-dasharray="5,3"/><text x="{x + 4:.1f}" y="{top + 12}" '
                     f'fill="#c44e52">{_e(label)}</text></g>')
    return _svg(width, height, "".join(parts), title)


def lines_chart(x: Sequence[float], series: Sequence[tuple[str, Sequence[float], str]],
                title: str, xlabel: str, ylabel: str, width: int = 720,
                height: int = 240, step: bool = True) -> str:
    """Lines over a shared x (a mixture schedule: weight per domain over steps)."""
    left, right, top, bottom = 52, 130, 14, 40
    pw, ph = width - left - right, height - top - bottom
    lo, hi = float(x[0]), float(x[-1]) if len(x) > 1 else float(x[0]) + 1
    ymax = max((v for _, vals, _ in series for v in vals), default=0) or 1

    def px(v: float) -> float:
        return left + pw * (v - lo) / ((hi - lo) or 1)

    def py(v: float) -> float:
        return top + ph * (1 - v / ymax)

    parts = [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
             f'stroke="#444"/><line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" '
             f'stroke="#444"/>']
    for t in _ticks(lo, hi, False):
        parts.append(f'<text x="{px(t):.1f}" y="{top + ph + 15}" text-anchor="middle">'
                     f'{_e(_num(t))}</text>')
    for frac in (0.5, 1.0):
        parts.append(f'<text x="{left - 4}" y="{py(ymax * frac) + 4:.1f}" text-anchor="end">'
                     f'{_e(_num(ymax * frac))}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">'
                 f'{_e(xlabel)}</text><text x="12" y="{top + ph / 2}" '
                 f'transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle">'
                 f'{_e(ylabel)}</text>')
    for j, (name, vals, color) in enumerate(series):
        pts = []
        for i, v in enumerate(vals):
            if step and i:
                pts.append(f"{px(x[i]):.1f},{py(vals[i - 1]):.1f}")
            pts.append(f"{px(x[i]):.1f},{py(v):.1f}")
        pts.append(f"{px(hi):.1f},{py(vals[-1]):.1f}")
        parts.append(f'<polyline class="series" data-series="{_e(name)}" '
                     f'points="{" ".join(pts)}" fill="none" stroke="{color}" '
                     f'stroke-width="2"/><rect x="{left + pw + 10}" y="{top + j * 16}" '
                     f'width="10" height="10" fill="{color}"/><text x="{left + pw + 24}" '
                     f'y="{top + j * 16 + 9}">{_e(name)}</text>')
    return _svg(width, height, "".join(parts), title)
