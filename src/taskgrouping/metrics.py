"""Summary metrics that compare methods across tasks.

* NormGain_L / NormGain_E (DMTG, Eqs. 7-8): mean over tasks of the relative loss / error reduction
  against a reference run (naive MTL by default).
* Delta_MTL (InterroGate, Eq. 6): mean over tasks of the signed relative change of a metric against
  single-task learning, positive when better.
* Mean rank across tasks.

Every function returns a plain float; :func:`summary_convention` gives the text recorded next to
the numbers in results, so a number is never separated from its reference and direction.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from taskgrouping.tasks import HIGHER_IS_BETTER

PerTask = Mapping[str, Mapping[str, float]]


def _check_same_tasks(a: PerTask, b: PerTask, what: str) -> list[str]:
    if set(a) != set(b):
        raise ValueError(f"{what}: task sets differ: {sorted(set(a) ^ set(b))}")
    return sorted(a)


def norm_gain(per_task: PerTask, reference: PerTask, metric: str = "loss",
              tasks: Iterable[str] | None = None) -> float:
    """mean_n (M_ref,n - M_n) / M_ref,n over ``tasks`` (default: all with the metric).

    With ``metric="loss"`` this is DMTG's NormGain_L (Eq. 7), with ``metric="error"`` NormGain_E
    (Eq. 8). Positive = better than the reference. Tasks whose reference value is 0 are skipped
    (the ratio is undefined); NaN if no task remains.
    """
    names = list(tasks) if tasks is not None else _check_same_tasks(per_task, reference, "norm_gain")
    gains = []
    for n in names:
        if metric not in per_task[n] or metric not in reference[n]:
            continue
        ref, val = reference[n][metric], per_task[n][metric]
        if ref == 0 or math.isnan(ref) or math.isnan(val):
            continue
        gains.append((ref - val) / ref)
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
    """Method -> mean over tasks of its rank (1 = best; ties share the average rank)."""
    methods = list(results)
    ranks = {m: [] for m in methods}
    for task, metric in metrics.items():
        sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
        vals = sorted((sign * results[m][task][metric], m) for m in methods)
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


def summary_convention(reference: str, stl: str | None) -> dict[str, str]:
    """Human-readable definitions stored with the numbers in results.json."""
    return {
        "norm_gain_l": f"mean over tasks of (L_ref - L)/L_ref on test loss, reference = {reference} (DMTG Eq. 7); "
                       "positive is better",
        "norm_gain_e": f"mean over classification tasks of (E_ref - E)/E_ref on test error, reference = {reference} "
                       "(DMTG Eq. 8); positive is better",
        "delta_mtl": (f"mean over tasks of (-1)^l (M - M_STL)/M_STL on each task's primary metric, STL = {stl} "
                      "(InterroGate Eq. 6); positive is better") if stl else "not computed (no single-task run)",
        "epoch_selection": "weights of the epoch with the lowest total validation loss",
    }
