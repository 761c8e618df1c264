"""Network selection of Standley et al. (ICML 2020), "Which Tasks Should Be Learned Together in
Multi-task Learning?" (Section 3.2, "Network Selection").

Given trained candidate networks -- each a set of tasks, an inference cost and a loss per task -- pick
networks whose total cost fits a budget so that the sum over tasks of each task's best loss among the
picked networks is as small as possible. A task may be trained in several picked networks; it is
served by the one with its lowest loss. This is a budgeted facility-location problem.

Two exact solvers:

* ``solver="search"``: the authors' branch-and-bound search, with their tie rule. At every node the
  candidates that exceed the remaining budget or improve no task (equal does not count) are dropped;
  the rest are sorted by their largest single-task improvement over the current solution; candidates
  are tried from the largest key down, each recursing only on the candidates sorted before it. An
  uncovered task counts ``uncovered`` (the original uses 99). Solutions are compared with BETTER, by
  default "keep the new solution unless the old one is *strictly* better", so among equal-valued
  solutions the last one found wins. That detail decides which of several tied networks is reported,
  and it is needed to reproduce the published HOA curves.
* ``solver="milp"``: an integer program solved to proven optimality by HiGHS through
  :func:`scipy.optimize.milp`; binary ``y_n`` (network n is used) and ``x_nt`` (n serves task t)::

      minimise   sum_{n,t} loss_nt x_nt
      subject to sum_n x_nt = 1 for every task t,   x_nt <= y_n,   sum_n cost_n y_n <= budget.

  Same optimum as the search; on ties it may pick other networks. It scales to hundreds of networks.

The estimated candidates of Section 3.3 are built in :mod:`taskgrouping.methods.standley.estimates`.
"""

from __future__ import annotations

import math
from operator import itemgetter, sub
from typing import Any, Literal, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from taskgrouping.methods.standley.networks import BetterRule, Candidate, Network, Selection, task_order

__all__ = ["UNCOVERED", "Solver", "Tie", "select_networks", "cheapest_cover_cost"]

UNCOVERED = 99.0
"""Loss counted for a task no chosen network covers (the constant of Standley's search)."""

_COST_TOL = 1e-9

Solver = Literal["search", "milp"]

#: Candidate networks up to which ``solver="auto"`` uses Standley's exact search (else the exact MILP,
#: whose time grows far more slowly with the number of candidates).
SEARCH_MAX_CANDIDATES = 64


def resolve_solver(solver: str, n_candidates: int) -> str:
    """``"auto"`` -> ``"search"`` for at most :data:`SEARCH_MAX_CANDIDATES` candidates, else ``"milp"``
    (both exact); any other value is returned as is."""
    if solver == "auto":
        return "search" if n_candidates <= SEARCH_MAX_CANDIDATES else "milp"
    return solver
Tie = Literal["standley", "first", "cheapest"]


def cheapest_cover_cost(networks: Sequence[Network], tasks: Sequence[str] | None = None) -> float:
    """Smallest total cost of a set of networks covering every task (weighted set cover, exact MILP)."""
    order = task_order(networks, tasks)
    col = {t: i for i, t in enumerate(order)}
    rows, cols = [], []
    for j, n in enumerate(networks):
        for t in n.tasks:
            rows.append(col[t])
            cols.append(j)
    a = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(order), len(networks))).tocsr()
    res = milp(np.array([n.cost for n in networks]), integrality=np.ones(len(networks)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(a, lb=1, ub=np.inf)], options={"mip_rel_gap": 0.0})
    if res.status != 0:
        raise RuntimeError(f"set-cover MILP failed: {res.message}")
    return float(res.fun)


def _cover_error(networks: Sequence[Network], tasks: Sequence[str], budget: float) -> ValueError:
    need = cheapest_cover_cost(networks, tasks)
    return ValueError(f"budget {budget:g} cannot cover all tasks: the cheapest set of networks covering "
                      f"every task costs {need:g}")


def select_networks(networks: Sequence[Network], budget: float, *, tasks: Sequence[str] | None = None,
                    solver: Solver = "search", better: BetterRule | None = None, tie: Tie = "standley",
                    uncovered: float = UNCOVERED, time_limit: float | None = None) -> Selection:
    """Choose networks within ``budget`` minimising the sum over tasks of each task's best loss.

    Args:
        networks: the candidates (order matters only for which of several tied solutions is returned).
        budget: largest allowed total cost (inclusive).
        tasks: the tasks to serve, in the order losses are summed; default: order of first appearance.
            A network naming any other task is an error.
        solver: "search" (Standley's exact search) or "milp" (exact integer program, HiGHS).
        better: search only -- ``better(new, old)`` decides whether a newly found solution replaces the
            incumbent (e.g. to impose per-task loss caps). Replaces the ``tie`` rule.
        tie: search only -- which of two equal-valued solutions is kept: "standley" (the later found,
            as the authors' code), "first" (the earlier found) or "cheapest" (lower cost, then earlier).
        uncovered: search only -- loss counted for an uncovered task; it must dominate the spread of
            the losses so that covering every task always wins.
        time_limit: MILP only -- seconds; the result then has ``optimal=False`` if not proven.

    Raises:
        ValueError: budget below the cheapest covering set (the message gives that set's cost), unknown
            task names, or options that do not apply to the solver.
    """
    order = task_order(networks, tasks)
    budget = float(budget)
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if solver == "search":
        if tie not in ("standley", "first", "cheapest"):
            raise ValueError(f"unknown tie rule {tie!r}; expected 'standley', 'first' or 'cheapest'")
        if time_limit is not None:
            raise ValueError("time_limit applies to solver='milp' only; the search always runs to the end")
        chosen = _search(networks, order, budget, better, tie, float(uncovered))
        optimal = True
    elif solver == "milp":
        if better is not None:
            raise ValueError("a BETTER rule applies to solver='search' only")
        if tie != "standley":
            raise ValueError(f"tie={tie!r} applies to solver='search' only; the MILP returns one optimum")
        chosen, optimal = _solve_milp(networks, order, budget, time_limit)
    else:
        raise ValueError(f"unknown solver {solver!r}; expected 'search' or 'milp'")
    return _make_selection(chosen, order, budget, solver, optimal)


def _make_selection(chosen: Sequence[Network], order: Sequence[str], budget: float, solver: str,
                    optimal: bool) -> Selection:
    serving: dict[str, Network] = {}
    scores: dict[str, float] = {}
    for t in order:
        for n in chosen:
            if t in n.losses and (t not in scores or n.losses[t] < scores[t]):
                scores[t], serving[t] = n.losses[t], n
    total = 0.0
    for t in order:
        total += scores[t]
    return Selection(tuple(chosen), serving, scores, total, float(sum(n.cost for n in chosen)), budget, solver,
                     optimal)


def _search(networks: Sequence[Network], order: Sequence[str], budget: float, better: BetterRule | None,
            tie: str, uncovered: float) -> list[Network]:
    """Standley's exhaustive search; returns the chosen networks in the order they were added."""
    n_tasks = len(order)
    perf = [tuple(n.losses.get(t, uncovered) for t in order) for n in networks]
    cost = [n.cost for n in networks]
    lows = [min(n.losses[t] for n in networks if t in n.losses) for t in order]
    highs = [max(n.losses[t] for n in networks if t in n.losses) for t in order]
    worst_needed = sum(h - lo for h, lo in zip(highs, lows)) + max(lows)
    if not uncovered > worst_needed:
        raise ValueError(f"uncovered={uncovered:g} is too small for these losses: it must exceed {worst_needed:g} "
                         "so that covering every task always beats leaving one out; pass a larger `uncovered`")

    def candidate(chosen: tuple[int, ...], running: list[float], value: float) -> Candidate:
        return Candidate(tuple(networks[c] for c in chosen), dict(zip(order, running)), value,
                         sum(cost[c] for c in chosen))

    # A solution is (value, chosen indices, running scores, cost); `keep_new(new, old)` is BETTER.
    if better is not None:
        def keep_new(new, old):
            return better(candidate(new[1], new[2], new[0]), candidate(old[1], old[2], old[0]))
    elif tie == "standley":
        def keep_new(new, old):
            return not old[0] < new[0]
    elif tie == "first":
        def keep_new(new, old):
            return new[0] < old[0]
    else:
        def keep_new(new, old):
            return new[0] < old[0] or (new[0] == old[0] and new[3] < old[3])

    # Pruning (ours; the authors' search visits every node). Incumbent = lowest value met so far. A
    # subtree whose lower bound exceeds it holds no optimal solution, so skipping it does not change
    # which optimum the tie rule returns. Bound: each task's best loss over the subtree's candidates
    # (or the subtree root's own value when none of them fits the budget left), summed in task order;
    # float addition is monotone, so the bound never exceeds a reachable value. A custom BETTER need
    # not prefer low values, so it gets no pruning.
    prune = better is None
    incumbent = [math.inf]

    def recurse(cands: list[int], sol: tuple, remaining: float) -> tuple:
        running = sol[2]
        if sol[0] < incumbent[0]:
            incumbent[0] = sol[0]
        limit = remaining + _COST_TOL
        # key = largest single-task improvement; > 0 exactly when the candidate improves some task.
        scored = [(k, c) for c in cands if cost[c] <= limit
                  for k in (max(map(sub, running, perf[c])),) if k > 0]
        if not scored:
            return sol
        scored.sort(key=itemgetter(0))
        kept = [c for _, c in scored]
        if prune:
            prefix, prefix_cost = [running], [math.inf]
            for c in kept:
                prefix.append(list(map(min, prefix[-1], perf[c])))
                prefix_cost.append(min(prefix_cost[-1], cost[c]))
        best = sol if sol[1] else None
        while kept:
            c = kept.pop()
            p = perf[c]
            new_running = list(map(min, p, running))
            left = remaining - cost[c]
            value = 0.0
            for v in new_running:
                value += v
            if prune:
                j = len(kept)
                if prefix_cost[j] <= left + _COST_TOL:
                    bound = 0.0
                    for v in map(min, prefix[j], p):
                        bound += v
                else:
                    bound = value
                if bound > incumbent[0]:
                    continue
            found = recurse(kept, (value, sol[1] + (c,), new_running, sol[3] + cost[c]), left)
            if best is None or keep_new(found, best):
                best = found
        return best if best is not None else sol

    root = (uncovered * n_tasks, (), [uncovered] * n_tasks, 0.0)
    best = recurse(list(range(len(networks))), root, budget)
    if any(v == uncovered for v in best[2]) or not best[1]:
        raise _cover_error(networks, order, budget)
    return [networks[c] for c in best[1]]


def _solve_milp(networks: Sequence[Network], order: Sequence[str], budget: float,
                time_limit: float | None) -> tuple[list[Network], bool]:
    """Facility-location MILP (see the module docstring); drops used networks that serve no task."""
    n_net = len(networks)
    col = {t: i for i, t in enumerate(order)}
    pairs = [(j, col[t], n.losses[t]) for j, n in enumerate(networks) for t in n.tasks]
    n_x = len(pairs)
    x_ids = np.arange(n_x)
    net_of = np.array([p[0] for p in pairs])
    task_of = np.array([p[1] for p in pairs])
    c = np.concatenate([np.zeros(n_net), np.array([p[2] for p in pairs])])
    serve_one = coo_matrix((np.ones(n_x), (task_of, n_net + x_ids)), shape=(len(order), n_net + n_x))
    link = coo_matrix((np.concatenate([np.ones(n_x), -np.ones(n_x)]),
                       (np.concatenate([x_ids, x_ids]), np.concatenate([n_net + x_ids, net_of]))),
                      shape=(n_x, n_net + n_x))
    spend = np.concatenate([np.array([n.cost for n in networks]), np.zeros(n_x)])[None, :]
    options: dict[str, Any] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(c, integrality=np.ones(n_net + n_x), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(serve_one.tocsr(), 1, 1), LinearConstraint(link.tocsr(), -np.inf, 0),
                            LinearConstraint(spend, -np.inf, budget + _COST_TOL)],
               options=options)
    if res.status == 2:
        raise _cover_error(networks, order, budget)
    if res.x is None:
        raise RuntimeError(f"MILP solver stopped without a solution (status {res.status}): {res.message}")
    serving_nets = {int(net_of[k]) for k in np.flatnonzero(res.x[n_net:] > 0.5)}
    return [networks[j] for j in sorted(serving_nets)], res.status == 0

