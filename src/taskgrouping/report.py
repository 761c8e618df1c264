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


def results_table(summary: dict[str, Any]) -> str:
    """The comparison table of every method in a run, followed by the groupings found."""
    ref = summary.get("reference") or "none"
    head = ["method", "groups", "total test loss", "total test error", f"NormGain_L vs {ref}",
            f"NormGain_E vs {ref}", "Δ_MTL vs STL", "mean rank", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, rec in summary["methods"].items():
        row = [name, str(len(rec["grouping"])), _fmt(rec["total_test_loss"]), _fmt(rec.get("total_test_error")),
               _fmt(rec.get("norm_gain_l"), signed=True), _fmt(rec.get("norm_gain_e"), signed=True),
               _fmt(rec.get("delta_mtl"), signed=True), _fmt(rec.get("mean_rank"), 2), _fmt(rec["train_seconds"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    ds = summary["dataset"]
    lines.append("")
    lines.append(f"dataset {ds['name']} ({len(ds['tasks'])} tasks), seed {summary['seed']}, K {summary['K']}; "
                 f"selection: {summary['conventions']['epoch_selection']}")
    for name, rec in summary["methods"].items():
        groups = " ".join("{" + ", ".join(g) + "}" for g in rec["grouping"])
        lines.append(f"- {name}: {groups}")
    return "\n".join(lines)
