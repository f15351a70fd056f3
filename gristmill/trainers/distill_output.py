"""What a distillation publishes: the synthetic shard, the learned step size, a report.

Used by ``gristmill distill`` and by the ``distill`` pipeline stage, so both
write the same three files:

``synthetic.parquet``
    ``id`` (``syn-<class>-<k>``), ``features`` (list of float32) or ``image``
    (nested lists ``[C][H][W]`` of float32), ``label`` (the input's label
    values); ``classes x ipc`` rows, in the caller's units.
``learned_lr.json``
    The learned student step size, its starting value, the loss at the start
    and end, and the configurations used.
``report.png``
    The synthetic examples drawn (an image grid, or for feature vectors a
    2-D PCA map of the real data with the synthetic points on top) and the
    matching loss and step size over the iterations.
"""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from gristmill.trainers.distill import DistillOutcome  # noqa: E402

SYNTHETIC_FILE = "synthetic.parquet"
LR_FILE = "learned_lr.json"
REPORT_FILE = "report.png"
MAX_REAL_POINTS = 2000  # real points drawn in the PCA map; more only slow the plot


def _label_array(labels: np.ndarray) -> pa.Array:
    if labels.dtype.kind in "iu":
        return pa.array(labels.astype(np.int64), pa.int64())
    if labels.dtype.kind == "f":
        return pa.array(labels.astype(np.float64), pa.float64())
    return pa.array([str(v) for v in labels], pa.string())


def synthetic_table(outcome: DistillOutcome) -> pa.Table:
    """The synthetic set as an Arrow table (``id``, ``features`` or ``image``, ``label``)."""
    x = outcome.x_syn
    y = outcome.y_syn
    ipc = outcome.config.ipc
    ids = [f"syn-{i // ipc:03d}-{i % ipc:04d}" for i in range(len(y))]
    if x.ndim == 4:
        name = "image"
        values = pa.array(x.tolist(), pa.list_(pa.list_(pa.list_(pa.float32()))))
    else:
        name = "features"
        values = pa.array(x.reshape(len(x), -1).tolist(), pa.list_(pa.float32()))
    return pa.table({"id": pa.array(ids, pa.string()), name: values, "label": _label_array(y)})


def learned_lr_record(outcome: DistillOutcome) -> dict[str, Any]:
    """The learned step size and the run's settings, JSON-ready."""
    res = outcome.result
    head = res.losses[: max(1, len(res.losses) // 10)]
    tail = res.losses[-max(1, len(res.losses) // 10):]
    return {
        "learned_lr": outcome.lr,
        "lr_init": outcome.config.lr_init,
        "iterations": outcome.config.iterations,
        "skipped_iterations": res.skipped,
        "matching_loss_first_10pct": float(np.mean(head)) if res.losses else None,
        "matching_loss_last_10pct": float(np.mean(tail)) if res.losses else None,
        "classes": [c.item() if hasattr(c, "item") else c for c in outcome.classes],
        "rows": int(len(outcome.y_syn)),
        "distill_config": outcome.config.model_dump(),
        "expert_config": outcome.expert_config.model_dump(),
    }


def report_png(outcome: DistillOutcome, x_real: np.ndarray | None = None,
               y_real: np.ndarray | None = None,
               draw_shape: tuple[int, ...] | None = None) -> bytes:
    """PNG: the synthetic examples drawn, and loss / step size per iteration.

    Images are drawn as a grid (class per column, at most 10 per class); flat
    rows are drawn as images when ``draw_shape`` (C, H, W) is given, else as a
    PCA map over the real data ``x_real`` (coloured by ``y_real``).
    """
    x = outcome.x_syn
    if draw_shape is not None and x.ndim == 2:
        x = x.reshape(len(x), *draw_shape)
    classes = outcome.classes
    ipc = outcome.config.ipc
    fig = plt.figure(figsize=(12, 5.5))
    grid = fig.add_gridspec(2, 2, width_ratios=[1.6, 1])
    if x.ndim == 4:
        shown = min(ipc, 10)
        sub = grid[:, 0].subgridspec(shown, len(classes), wspace=0.05, hspace=0.05)
        for c in range(len(classes)):
            for k in range(shown):
                ax = fig.add_subplot(sub[k, c])
                img = x[c * ipc + k]
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
                lo, hi = np.percentile(img, [1, 99])
                ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1), cmap="gray_r")
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(str(classes[c]), fontsize=8)
    else:
        ax = fig.add_subplot(grid[:, 0])
        flat_syn = x.reshape(len(x), -1)
        basis_data = flat_syn if x_real is None else np.asarray(x_real, np.float32).reshape(
            len(x_real), -1)
        mean = basis_data.mean(0)
        _, _, vt = np.linalg.svd(basis_data - mean, full_matrices=False)
        proj = vt[:2].T
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        class_index = {v: i for i, v in enumerate(classes.tolist())}
        if x_real is not None and y_real is not None:
            keep = np.random.default_rng(0).permutation(len(basis_data))[:MAX_REAL_POINTS]
            pts = (basis_data[keep] - mean) @ proj
            cols = [cmap(class_index[v] % cmap.N) for v in np.asarray(y_real)[keep].tolist()]
            ax.scatter(pts[:, 0], pts[:, 1], c=cols, s=4, alpha=0.25, linewidths=0)
        pts = (flat_syn - mean) @ proj
        cols = [cmap(class_index[v] % cmap.N) for v in outcome.y_syn.tolist()]
        ax.scatter(pts[:, 0], pts[:, 1], c=cols, s=90, marker="*", edgecolors="black",
                   linewidths=0.6)
        ax.set_title(f"synthetic set ({ipc} per class, stars) on the real data, PCA")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    losses = outcome.result.losses
    ax = fig.add_subplot(grid[0, 1])
    ax.plot(losses, lw=0.6, color="tab:blue")
    if len(losses) >= 20:
        w = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(losses)), smooth, color="black", lw=1.2)
    ax.set_title("matching loss")
    ax = fig.add_subplot(grid[1, 1])
    ax.plot(outcome.result.lr_history, color="tab:orange")
    ax.set_title(f"learned step size (final {outcome.lr:.4g})")
    ax.set_xlabel("iteration")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def distill_artifacts(outcome: DistillOutcome, x_real: np.ndarray | None = None,
                      y_real: np.ndarray | None = None,
                      draw_shape: tuple[int, ...] | None = None) -> dict[str, bytes]:
    """``{filename: bytes}`` of the three published files (``report_png`` for the drawing)."""
    buf = io.BytesIO()
    pq.write_table(synthetic_table(outcome), buf, compression="zstd")
    return {
        SYNTHETIC_FILE: buf.getvalue(),
        LR_FILE: json.dumps(learned_lr_record(outcome), indent=2).encode(),
        REPORT_FILE: report_png(outcome, x_real, y_real, draw_shape),
    }
