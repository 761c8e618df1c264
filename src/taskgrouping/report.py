"""Tables (markdown, paste-ready) and figures from a run's ``results.json``."""

from __future__ import annotations

import math
from typing import Any

from taskgrouping.figures import assignment_heatmaps

__all__ = ["results_table", "console_table", "grouping_lines", "groups_inline", "group_sizes",
           "assignment_heatmaps"]  # assignment_heatmaps lives in taskgrouping.figures


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


def _primary_metric(summary: dict[str, Any]) -> str | None:
    """The run's ``primary_metric`` when it names one metric (``None``: each task's own, as before)."""
    metric = summary.get("primary_metric")
    from taskgrouping.metrics import PER_TASK_PRIMARY

    return metric if metric and metric != PER_TASK_PRIMARY else None


def results_table(summary: dict[str, Any]) -> str:
    """The comparison table of every method in a run, followed by the groupings found."""
    ref = summary.get("reference") or "none"
    primary = _primary_metric(summary)
    head = ["method", "groups", "total test loss", "total test error", f"NormGain_L vs {ref}",
            f"NormGain_E vs {ref}", "Δ_MTL vs STL", f"mean rank ({primary})" if primary else "mean rank", "train s"]
    if primary:  # the run's primary metric: its NormGain after NormGain_L / NormGain_E
        head[6:6] = [f"NormGain_M ({primary}) vs {ref}"]
    ranking = _has_binary(summary)
    if ranking:  # binary tasks: their mean AUROC and average precision, before the training time
        head[-1:-1] = ["mean AUROC", "mean AP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, rec in summary["methods"].items():
        row = [name, str(len(rec["grouping"])), _fmt(rec["total_test_loss"]), _fmt(rec.get("total_test_error")),
               _fmt(rec.get("norm_gain_l"), signed=True), _fmt(rec.get("norm_gain_e"), signed=True),
               _fmt(rec.get("delta_mtl"), signed=True), _fmt(rec.get("mean_rank"), 2), _fmt(rec["train_seconds"], 1)]
        if primary:
            row[6:6] = [_fmt(rec.get("norm_gain_m"), signed=True)]
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


#: tasks up to which the console lists every group in full (as ``table.md`` always does)
CONSOLE_FULL_TASKS = 16
#: above that, the names shown per group and the groups shown per method
CONSOLE_NAMES = 4
CONSOLE_GROUPS = 6


def group_sizes(groups: list[list[str]]) -> str:
    """Group sizes, largest first, repeats counted: ``"47, 46 ×2"``, ``"1 ×139"``."""
    sizes = sorted((len(g) for g in groups), reverse=True)
    out: list[str] = []
    for size in dict.fromkeys(sizes):
        n = sizes.count(size)
        out.append(f"{size} ×{n}" if n > 1 else str(size))
    return ", ".join(out)


def grouping_lines(name: str, groups: list[list[str]], max_names: int = CONSOLE_NAMES,
                   max_groups: int = CONSOLE_GROUPS) -> list[str]:
    """A method's grouping for the console when there are many tasks: a line with the number and sizes
    of its groups, then one indented line per group (at most ``max_groups``) with at most ``max_names``
    names and ``… (+n more)``, then ``… (+m more groups)`` if some were left out."""
    plural = "s" if len(groups) != 1 else ""
    lines = [f"- {name}: {len(groups)} group{plural} (sizes {group_sizes(groups)})"]
    for g in groups[:max_groups]:
        shown = ", ".join(g[:max_names]) + (f", … (+{len(g) - max_names} more)" if len(g) > max_names else "")
        lines.append(f"    {{{shown}}}")
    if len(groups) > max_groups:
        lines.append(f"    … (+{len(groups) - max_groups} more groups)")
    return lines


def groups_inline(groups: list[list[str]], n_tasks: int) -> str:
    """One method's groups on one line: the lists themselves up to :data:`CONSOLE_FULL_TASKS` tasks,
    else their number and sizes."""
    if n_tasks <= CONSOLE_FULL_TASKS:
        return str(groups)
    return f"{len(groups)} group{'s' if len(groups) != 1 else ''} (sizes {group_sizes(groups)})"


def console_table(summary: dict[str, Any], where: str | None = None) -> str:
    """What the console shows at the end of a run: :func:`results_table` as is up to
    :data:`CONSOLE_FULL_TASKS` tasks; with more, each method's grouping line replaced by
    :func:`grouping_lines` (group sizes and a few names per group) and a pointer to ``where`` the
    full lists are (``table.md`` and ``results.json`` keep them whole)."""
    table = results_table(summary)
    if len(summary["dataset"]["tasks"]) <= CONSOLE_FULL_TASKS:
        return table
    compact = {f"- {name}: ": grouping_lines(name, rec["grouping"]) for name, rec in summary["methods"].items()}
    lines: list[str] = []
    for line in table.split("\n"):
        prefix = next((p for p in compact if line.startswith(p)), None)
        lines.extend(compact.pop(prefix) if prefix is not None else [line])
    if where:
        lines.append(f"(every group in full: {where})")
    return "\n".join(lines)
