"""Figures of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state) and written
atomically: ``DIR/figures/comparison.png`` (each method's NormGain against its training time) and
DMTG's assignment heatmaps (``DIR/figures/<method>_assignment.png``).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from taskgrouping.io import atomic_write_bytes

__all__ = ["comparison_figure", "comparison_points", "assignment_heatmaps", "normgain_key", "save_figure"]

#: NormGain columns the comparison can plot, in order of preference, with their axis labels
NORMGAINS = {"norm_gain_m": "NormGain_M", "norm_gain_l": "NormGain_L (test loss)"}


def save_figure(fig: Any, path: Path | str, dpi: int = 120) -> Path:
    """Render ``fig`` to PNG (or the format of ``path``'s suffix) in memory, then write it atomically
    (a reader never sees half an image); parent folders are created."""
    out = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def normgain_key(methods: dict[str, dict[str, Any]]) -> str | None:
    """The NormGain column to plot: ``norm_gain_m`` when every method has a finite one, else
    ``norm_gain_l`` when some method has one, else ``None`` (no reference run)."""
    for key in NORMGAINS:
        values = [rec.get(key) for rec in methods.values()]
        if key == "norm_gain_m" and values and all(_finite(v) for v in values):
            return key
        if key == "norm_gain_l" and any(_finite(v) for v in values):
            return key
    return None


def comparison_points(summary: dict[str, Any]) -> tuple[str, list[tuple[str, float, float]]]:
    """The NormGain column plotted (:func:`normgain_key`) and one ``(method, train_seconds, NormGain)``
    per method that has both numbers, in the run's order.

    Raises:
        ValueError: no method has a NormGain (the reference method was not run).
    """
    methods = summary["methods"]
    key = normgain_key(methods)
    if key is None:
        raise ValueError("no method has a NormGain (the reference method was not run); expected results with "
                         "norm_gain_l or norm_gain_m")
    return key, [(name, float(rec["train_seconds"]), float(rec[key])) for name, rec in methods.items()
                 if _finite(rec.get(key)) and _finite(rec.get("train_seconds"))]


def comparison_figure(summary: dict[str, Any], path: Path | str) -> Path:
    """Each method's NormGain (vs the run's reference) against its training cost, one labelled point
    per method (variants such as ``dmtg/retrain_scratch`` included), as a PNG at ``path``.

    The cost is ``train_seconds``: the measured wall time of all training the method did, searches
    and warm starts included (evaluation excluded). It is the one cost every method records; FLOPs
    would miss DMTG's Gumbel samples and pruned heads and the two-shot methods' candidate networks.
    The time axis is logarithmic when the times span more than a factor of 20.

    Raises:
        ValueError: no method has a NormGain (the reference method was not run).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, points = comparison_points(summary)
    ref = summary.get("reference") or "reference"
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    for name, seconds, gain in points:
        is_ref = name == summary.get("reference")
        ax.scatter([seconds], [gain], s=46, marker="s" if is_ref else "o", zorder=3)
        ax.annotate(name, (seconds, gain), textcoords="offset points", xytext=(6, 4), fontsize=8)
    times = [s for _, s, _ in points if s > 0]
    if times and max(times) > 20 * min(times):
        ax.set_xscale("log")
    ds = summary.get("dataset") or {}
    label = NORMGAINS[key]
    metric = (summary.get("config") or {}).get("primary_metric")
    if key == "norm_gain_m" and isinstance(metric, str):
        label = f"NormGain_M (test {metric})"
    ax.set(xlabel="training time (s, measured wall clock, all networks the method trained)",
           ylabel=f"{label} vs {ref} (higher is better)",
           title=f"{ds.get('name', '')} ({len(ds.get('tasks') or [])} tasks), seed {summary.get('seed')}, "
                 f"K {summary.get('K')}")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def assignment_heatmaps(history: Sequence[Sequence[Sequence[float]]], task_names: list[str], path) -> Path:
    """DMTG's assignment probabilities as a figure (PNG): left, each task's probability of its final
    group over the epochs (rows tasks, columns epochs); right, the final N x K matrix softmax(S).

    ``history`` holds one N x K probability matrix per epoch.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs = np.asarray(history, dtype=float)  # epochs x N x K
    final = probs[-1]
    chosen = final.argmax(axis=1)
    over_time = probs[:, np.arange(len(task_names)), chosen].T  # N x epochs
    n, k = final.shape
    fig = Figure(figsize=(4 + 0.25 * probs.shape[0] + 0.5 * k, 1.5 + 0.3 * n))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(probs.shape[0], 2), max(k, 2)]})
    im = ax1.imshow(over_time, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax1.set(title="P(task -> its final group)", xlabel="epoch", yticks=range(n), yticklabels=task_names)
    ax2.imshow(final, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax2.set(title="final softmax(S)", xlabel="group", xticks=range(k), yticks=range(n), yticklabels=[])
    for i in range(n):
        for j in range(k):
            ax2.text(j, i, f"{final[i, j]:.2f}", ha="center", va="center", fontsize=7,
                     color="black" if final[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=[ax1, ax2], fraction=0.03)
    return save_figure(fig, path)
