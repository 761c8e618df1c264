"""Trajectory plots of the diagnostics, in the manner of Mao et al. (2024) Figures 3-5."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from taskgrouping.diagnostics.measures import MEASURES, check_measures
from taskgrouping.figures import save_figure

_LABELS = {
    "gds": "GDS (gradient direction similarity)",
    "gms": "GMS (gradient magnitude similarity)",
    "fd": "FD (task entropy per feature, nats)",
}

def plot_trajectories(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                      measures: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Trajectory plots in the manner of Mao et al. Figures 3-5: one panel per measure, one line
    per run (measure value against training step). Written with the Agg canvas, no pyplot state.

    Args:
        histories: run name -> history (list of ``{"step", <measure>...}`` dicts).
        path: image file to write (format from the suffix, e.g. ``.png``/``.pdf``); parent
            directories are created.
        measures: panels to draw; default every measure present in some history.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not histories:
        raise ValueError("histories is empty; expected {run_name: history}")
    for run, hist in histories.items():
        for i, h in enumerate(hist):
            if "step" not in h:
                raise ValueError(f"history of run {run!r}: entry {i} has no 'step'")
    if measures is None:
        present = {k for hist in histories.values() for h in hist for k in h}
        ms = tuple(m for m in MEASURES if m in present)
        if not ms:
            raise ValueError(f"no history holds any of the measures {MEASURES}")
    else:
        ms = check_measures(measures)
    fig = Figure(figsize=(4.2 * len(ms), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ms), squeeze=False)[0]
    for ax, m in zip(axes, ms):
        for run, hist in histories.items():
            pts = [(h["step"], h[m]) for h in hist if m in h]
            if pts:
                steps, values = zip(*sorted(pts))
                ax.plot(steps, values, label=str(run), linewidth=1.4)
        ax.set_title(_LABELS[m], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


__all__ = ["plot_trajectories"]
