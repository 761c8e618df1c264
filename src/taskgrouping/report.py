"""Tables (markdown, paste-ready) and figures from a run's ``results.json``."""

from __future__ import annotations

import math
from typing import Any


def _fmt(x: Any, digits: int = 4, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return str(x)


def _has_binary(summary: dict[str, Any]) -> bool:
    """Whether the run has binary tasks: only theirs report ``auroc``."""
    return any(isinstance(m, dict) and "auroc" in m
               for rec in summary["methods"].values() for m in (rec.get("per_task") or {}).values())


def results_table(summary: dict[str, Any]) -> str:
    """The comparison table of every method in a run, followed by the groupings found."""
    ref = summary.get("reference") or "none"
    head = ["method", "groups", "total test loss", "total test error", f"NormGain_L vs {ref}",
            f"NormGain_E vs {ref}", "Δ_MTL vs STL", "mean rank", "train s"]
    ranking = _has_binary(summary)
    if ranking:  # binary tasks: their mean AUROC and average precision, before the training time
        head[-1:-1] = ["mean AUROC", "mean AP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, rec in summary["methods"].items():
        row = [name, str(len(rec["grouping"])), _fmt(rec["total_test_loss"]), _fmt(rec.get("total_test_error")),
               _fmt(rec.get("norm_gain_l"), signed=True), _fmt(rec.get("norm_gain_e"), signed=True),
               _fmt(rec.get("delta_mtl"), signed=True), _fmt(rec.get("mean_rank"), 2), _fmt(rec["train_seconds"], 1)]
        if ranking:
            row[-1:-1] = [_fmt(rec.get("mean_auroc")), _fmt(rec.get("mean_average_precision"))]
        lines.append("| " + " | ".join(row) + " |")
    ds = summary["dataset"]
    lines.append("")
    lines.append(f"dataset {ds['name']} ({len(ds['tasks'])} tasks), seed {summary['seed']}, K {summary['K']}; "
                 f"selection: {summary['conventions']['epoch_selection']}")
    for name, rec in summary["methods"].items():
        groups = " ".join("{" + ", ".join(g) + "}" for g in rec["grouping"])
        lines.append(f"- {name}: {groups}")
    return "\n".join(lines)


def assignment_heatmaps(history: list[list[list[float]]], task_names: list[str], path) -> None:
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
    fig.savefig(str(path), dpi=120, bbox_inches="tight")
