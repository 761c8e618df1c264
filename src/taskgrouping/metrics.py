"""Summary metrics that compare methods across tasks.

* NormGain_L / NormGain_E (DMTG, Eqs. 7-8): mean over tasks of the relative loss / error reduction
  against a reference run (naive MTL by default).
* Delta_MTL (InterroGate, Eq. 6): mean over tasks of the signed relative change of a metric against
  single-task learning, positive when better.
* NormGain_M: the same relative gain on the run's ``primary_metric`` (error, loss, AUROC or average
  precision), signed by the metric's direction, over the tasks that report it.
* Mean rank across tasks.

Every function returns a plain float; :func:`summary_convention` gives the text recorded next to
the numbers in results, so a number is never separated from its reference and direction.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from taskgrouping.tasks import HIGHER_IS_BETTER, Task

PerTask = Mapping[str, Mapping[str, float]]

#: Metrics a run can rank methods by (config key ``primary_metric``) and select epochs on
#: (``train.select_metric``).
PRIMARY_METRICS: tuple[str, ...] = ("error", "loss", "auroc", "average_precision")
#: ``primary_metric``'s default: each task ranked on its own primary metric (``Task.primary_metric``:
#: error for classification, mIoU for segmentation, loss otherwise) and no NormGain_M column.
PER_TASK_PRIMARY = "task"


def _value(x: object) -> float:
    """A metric as a float; missing (``None``, as results.json writes NaN) is NaN."""
    return math.nan if x is None else float(x)  # type: ignore[arg-type]


def tasks_with_metric(tasks: Iterable[Task], metric: str) -> list[str]:
    """Names of the tasks whose meter reports ``metric`` (``error``: binary and multi-class tasks;
    ``auroc`` / ``average_precision``: binary tasks; ``loss``: every task)."""
    return [t.name for t in tasks if metric in t.meter().compute()]


def selection_score(val: PerTask, metric: str) -> float:
    """One validation epoch's score for ``train.select_metric`` (lower is better): the total
    validation loss for ``loss``; otherwise the mean of ``metric`` over the tasks that report a
    defined value, negated when higher is better. NaN when no task does."""
    if metric == "loss":
        return float(sum(m["loss"] for m in val.values()))
    vals = [v for v in (_value(m.get(metric)) for m in val.values() if metric in m) if not math.isnan(v)]
    if not vals:
        return math.nan
    mean = sum(vals) / len(vals)
    return -mean if HIGHER_IS_BETTER[metric] else mean


def improves(score: float, best: float | None) -> bool:
    """Whether an epoch scoring ``score`` beats the best so far (lower is better); an undefined best
    (NaN or None) is beaten by any defined score, an undefined score beats nothing."""
    if math.isnan(score):
        return False
    return best is None or math.isnan(best) or score < best


def _check_same_tasks(a: PerTask, b: PerTask, what: str) -> list[str]:
    if set(a) != set(b):
        raise ValueError(f"{what}: task sets differ: {sorted(set(a) ^ set(b))}")
    return sorted(a)


def norm_gain(per_task: PerTask, reference: PerTask, metric: str = "loss",
              tasks: Iterable[str] | None = None) -> float:
    """mean_n of the relative gain on ``metric`` over ``tasks`` (default: all with the metric):
    ``(M_ref,n - M_n) / M_ref,n`` when lower is better (loss, error), ``(M_n - M_ref,n) / M_ref,n``
    when higher is better (AUROC, average precision).

    With ``metric="loss"`` this is DMTG's NormGain_L (Eq. 7), with ``metric="error"`` NormGain_E
    (Eq. 8), with the run's ``primary_metric`` NormGain_M. Positive = better than the reference.
    Tasks whose reference value is 0 or whose value is undefined (NaN / None) are skipped (the ratio
    is undefined); NaN if no task remains.
    """
    names = list(tasks) if tasks is not None else _check_same_tasks(per_task, reference, "norm_gain")
    sign = -1.0 if HIGHER_IS_BETTER.get(metric, False) else 1.0
    gains = []
    for n in names:
        if metric not in per_task[n] or metric not in reference[n]:
            continue
        ref, val = _value(reference[n][metric]), _value(per_task[n][metric])
        if ref == 0 or math.isnan(ref) or math.isnan(val):
            continue
        gains.append(sign * (ref - val) / ref)
    return sum(gains) / len(gains) if gains else math.nan


def delta_mtl(per_task: PerTask, stl: PerTask, metrics: Mapping[str, Sequence[str]]) -> float:
    """Delta_MTL = mean_i (-1)^{l_i} (M_i - M_STL,i) / M_STL,i over every (task, metric) pair given.

    ``l_i = 1`` when lower is better (InterroGate Eq. 6), so the result is positive when the method
    beats single-task learning. ``metrics`` maps task -> metric names to include.
    """
    terms = []
    for task, names in metrics.items():
        for m in names:
            if m not in HIGHER_IS_BETTER:
                raise ValueError(f"delta_mtl: unknown direction for metric {m!r} of task {task!r}")
            base, val = stl[task][m], per_task[task][m]
            if base == 0 or math.isnan(base) or math.isnan(val):
                continue
            sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0
            terms.append(sign * (val - base) / base)
    return sum(terms) / len(terms) if terms else math.nan


def mean_rank(results: Mapping[str, PerTask], metrics: Mapping[str, str]) -> dict[str, float]:
    """Method -> mean over tasks of its rank (1 = best, in the metric's direction; ties share the
    average rank). A task on which some method has no defined value (missing, NaN, None) is left out:
    it cannot order every method."""
    methods = list(results)
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    for task, metric in metrics.items():
        sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
        values = [_value((results[m].get(task) or {}).get(metric)) for m in methods]
        if any(math.isnan(v) for v in values):
            continue
        vals = sorted((sign * v, m) for v, m in zip(values, methods))
        i = 0
        while i < len(vals):
            j = i
            while j + 1 < len(vals) and vals[j + 1][0] == vals[i][0]:
                j += 1
            for k in range(i, j + 1):
                ranks[vals[k][1]].append((i + j) / 2 + 1)
            i = j + 1
    return {m: sum(r) / len(r) if r else math.nan for m, r in ranks.items()}


def total(per_task: PerTask, metric: str) -> float:
    """Sum of ``metric`` over the tasks that report it (NaN if none does)."""
    vals = [m[metric] for m in per_task.values() if metric in m]
    return float(sum(vals)) if vals else math.nan


def summary_convention(reference: str, stl: str | None, primary_metric: str = PER_TASK_PRIMARY,
                       select: str = "best_val", select_metric: str = "loss") -> dict[str, str]:
    """Human-readable definitions stored with the numbers in results.json."""
    if primary_metric == PER_TASK_PRIMARY:
        norm_gain_m = "not computed (primary_metric: task)"
        rank = ("mean over tasks of the method's rank (1 = best) on each task's primary metric (error for "
                "classification, mIoU for segmentation, loss otherwise)")
    else:
        better = "higher" if HIGHER_IS_BETTER[primary_metric] else "lower"
        formula = "(M - M_ref)/M_ref" if better == "higher" else "(M_ref - M)/M_ref"
        norm_gain_m = (f"mean over the tasks reporting {primary_metric} of {formula} on test {primary_metric} "
                       f"({better} is better), reference = {reference}; positive is better")
        rank = (f"mean over the tasks reporting {primary_metric} of the method's rank (1 = best, {better} "
                f"{primary_metric} is better); tasks where a method's value is undefined are left out")
    if select == "last":
        selection = "weights of the last epoch"
    elif select_metric == "loss":
        selection = "weights of the epoch with the lowest total validation loss"
    else:
        better = "highest" if HIGHER_IS_BETTER[select_metric] else "lowest"
        selection = (f"weights of the epoch with the {better} mean validation {select_metric} over the tasks "
                     "reporting it")
    return {
        "norm_gain_l": f"mean over tasks of (L_ref - L)/L_ref on test loss, reference = {reference} (DMTG Eq. 7); "
                       "positive is better",
        "norm_gain_e": f"mean over classification tasks of (E_ref - E)/E_ref on test error, reference = {reference} "
                       "(DMTG Eq. 8); positive is better",
        "norm_gain_m": norm_gain_m,
        "delta_mtl": (f"mean over tasks of (-1)^l (M - M_STL)/M_STL on each task's primary metric, STL = {stl} "
                      "(InterroGate Eq. 6); positive is better") if stl else "not computed (no single-task run)",
        "mean_rank": rank,
        "epoch_selection": selection,
    }
