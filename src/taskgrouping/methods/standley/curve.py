"""Selection curves of Standley et al. (ICML 2020, Figures 2-5): select at every budget on one loss set
(validation, or its HOA / ESA approximation) and report the chosen networks' losses from another
(test); a task's reported loss is its lowest reported loss among the chosen networks.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Sequence

from taskgrouping.methods.standley.estimates import esa_networks, hoa_networks
from taskgrouping.methods.standley.networks import Network, task_order
from taskgrouping.methods.standley.selection import Tie, resolve_solver, select_networks

__all__ = ["Approx", "report_scores", "selection_curve"]

Approx = Literal["optimal", "hoa", "esa"]


def report_scores(chosen: Iterable[Network], report: Sequence[Network]) -> dict[str, float]:
    """Per-task best loss of the chosen networks, read from another loss set (e.g. test losses).

    Networks are matched by task set and cost. As in the paper, a task's reported loss is its lowest
    reported loss among the chosen networks.
    """
    index: dict[tuple[frozenset[str], float], Network] = {}
    for n in report:
        if n.key in index:
            raise ValueError(f"network {n.label} appears twice in the report losses")
        index[n.key] = n
    scores: dict[str, float] = {}
    for n in chosen:
        if n.key not in index:
            raise ValueError(f"chosen network {n.label} has no entry in the report losses")
        for t, v in index[n.key].losses.items():
            scores[t] = min(v, scores.get(t, math.inf))
    return scores


def selection_curve(val: Sequence[Network], report: Sequence[Network] | None, budgets: Iterable[float], *,
                    approx: Approx = "optimal", early: Sequence[Network] | None = None, solver: str = "auto",
                    tie: Tie = "standley", tasks: Sequence[str] | None = None) -> dict[float, dict[str, Any]]:
    """Select at every budget and report the chosen networks' losses (the paper's Figures 2-5).

    ``solver``: ``"search"``, ``"milp"`` or ``"auto"`` (:func:`resolve_solver` on the number of
    candidates). ``approx``: "optimal" selects on ``val``; "hoa" on :func:`hoa_networks` of ``val``; "esa" on
    ``early`` (required). The reported total is the sum over tasks of the lowest ``report`` loss among
    the chosen networks (``report=None`` reports ``val``).

    Returns ``{budget: {"networks": [{"tasks": [...], "cost": c}, ...], "total": float}}``.
    """
    report = val if report is None else report
    order = task_order(val, tasks)
    if approx == "optimal":
        cands = list(val)
    elif approx == "hoa":
        cands = hoa_networks(val)
    elif approx == "esa":
        if early is None:
            raise ValueError("approx='esa' needs the early-stopped losses (`early`)")
        cands = esa_networks(early, report)
    else:
        raise ValueError(f"unknown approximation {approx!r}; expected 'optimal', 'hoa' or 'esa'")
    if early is not None and approx != "esa":
        raise ValueError(f"early losses are only used with approx='esa', not {approx!r}")
    solver = resolve_solver(solver, len(cands))
    out: dict[float, dict[str, Any]] = {}
    for b in budgets:
        sel = select_networks(cands, b, tasks=order, solver=solver, tie=tie)
        scores = report_scores(sel.networks, report)
        total = 0.0
        for t in order:
            total += scores[t]
        out[float(b)] = {"networks": [n.to_json() for n in sel.networks], "total": total}
    return out
