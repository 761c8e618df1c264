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

Approximations of Section 3.3: :func:`hoa_networks` (higher-order approximation: a network of >= 3
tasks is estimated from the pair networks inside it) and :func:`esa_networks` (early-stopping
approximation: select on losses measured after ~20 % of training). :func:`selection_curve` selects
on one set of losses (validation) and reports the chosen networks' losses from another (test), as in
the paper's figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import itemgetter, sub
from types import MappingProxyType
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from taskgrouping.grouping.grouping import Grouping

__all__ = [
    "Network",
    "Candidate",
    "Selection",
    "select_networks",
    "cheapest_cover_cost",
    "hoa_networks",
    "esa_networks",
    "report_scores",
    "selection_curve",
    "parse_budgets",
    "select_cli",
]

UNCOVERED = 99.0
"""Loss counted for a task no chosen network covers (the constant of Standley's search)."""

_COST_TOL = 1e-9

Solver = Literal["search", "milp"]
Tie = Literal["standley", "first", "cheapest"]
Approx = Literal["optimal", "hoa", "esa"]


@dataclass(frozen=True)
class Network:
    """One trained (or estimated) network: the tasks it has heads for, its cost and its per-task losses.

    A network is identified by its task *set* and its cost (:attr:`key`), so a half-sized single-task
    network (cost 0.5) and the full-sized one (cost 1) are different networks.
    """

    tasks: tuple[str, ...]
    cost: float
    losses: Mapping[str, float] = field(hash=False)

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, (set, frozenset)):
            tasks = sorted(tasks)
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("a network needs at least one task")
        for t in tasks:
            if not isinstance(t, str) or not t:
                raise ValueError(f"task names must be non-empty strings, got {t!r} in {list(tasks)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"network lists a task twice: {list(tasks)}")
        cost = float(self.cost)
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"network {'|'.join(tasks)}: cost must be a finite number >= 0, got {self.cost!r}")
        if set(self.losses) != set(tasks):
            raise ValueError(f"network {'|'.join(tasks)}: losses must be given for exactly its tasks; "
                             f"got losses for {sorted(self.losses)}")
        losses = {}
        for t in tasks:
            v = float(self.losses[t])
            if not math.isfinite(v):
                raise ValueError(f"network {'|'.join(tasks)}: loss of task {t!r} must be finite, got {v!r}")
            losses[t] = v
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "losses", MappingProxyType(losses))

    @property
    def key(self) -> tuple[frozenset[str], float]:
        """What identifies the network across loss files: its task set and its cost."""
        return frozenset(self.tasks), self.cost

    @property
    def label(self) -> str:
        return f"{'|'.join(self.tasks)} (cost {self.cost:g})"

    def to_json(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "cost": self.cost}


class Candidate(NamedTuple):
    """A (partial) solution as shown to a user-defined BETTER rule."""

    networks: tuple[Network, ...]
    scores: dict[str, float]
    """Per task: best loss among ``networks``, or the uncovered constant."""
    total: float
    cost: float


BetterRule = Callable[[Candidate, Candidate], bool]
"""``better(new, old) -> True`` to replace the incumbent ``old`` by the newly found ``new``."""


@dataclass(frozen=True)
class Selection:
    """Result of :func:`select_networks`.

    Attributes:
        networks: the chosen networks, in the order the solver found them.
        serving: task -> the chosen network with the task's lowest loss (first on ties).
        scores: task -> that loss.
        total: sum of ``scores`` (the objective).
        cost: total cost of ``networks``.
        budget: the budget asked for.
        solver: "search" or "milp".
        optimal: whether the solver proved optimality (always for the search; for the MILP unless a
            time limit cut it short).
    """

    networks: tuple[Network, ...]
    serving: dict[str, Network]
    scores: dict[str, float]
    total: float
    cost: float
    budget: float
    solver: str
    optimal: bool = True

    def to_grouping(self) -> Grouping:
        """The selection as the library's :class:`Grouping` (groups = chosen networks, may overlap)."""
        index = {id(n): k for k, n in enumerate(self.networks)}
        return Grouping(tuple(n.tasks for n in self.networks),
                        {t: index[id(n)] for t, n in self.serving.items()},
                        {"method": "standley_selection", "solver": self.solver, "budget": self.budget,
                         "total": self.total, "costs": [n.cost for n in self.networks]})


def _task_order(networks: Sequence[Network], tasks: Sequence[str] | None) -> tuple[str, ...]:
    if not networks:
        raise ValueError("no candidate networks given")
    seen: dict[str, None] = {}
    for n in networks:
        if not isinstance(n, Network):
            raise TypeError(f"candidates must be Network objects, got {type(n).__name__}")
        for t in n.tasks:
            seen.setdefault(t)
    if tasks is None:
        return tuple(seen)
    tasks = tuple(tasks)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks lists a task twice: {list(tasks)}")
    unknown = [t for t in seen if t not in set(tasks)]
    if unknown:
        bad = next(n for n in networks if unknown[0] in n.tasks)
        raise ValueError(f"unknown task {unknown[0]!r} in network {bad.label}; expected one of {list(tasks)}")
    never = [t for t in tasks if t not in seen]
    if never:
        raise ValueError(f"task {never[0]!r} is in no candidate network, so no budget can cover it")
    return tasks


def cheapest_cover_cost(networks: Sequence[Network], tasks: Sequence[str] | None = None) -> float:
    """Smallest total cost of a set of networks covering every task (weighted set cover, exact MILP)."""
    order = _task_order(networks, tasks)
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
    order = _task_order(networks, tasks)
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


def hoa_networks(measured: Sequence[Network], *, extra_sets: Iterable[Iterable[str]] = (),
                 extra_cost: float = 1.0) -> list[Network]:
    """Higher-order approximation (Standley et al., Section 3.3).

    Networks of one or two tasks are kept as measured. For every network of >= 3 tasks -- the
    measured ones, whose losses are replaced, and ``extra_sets`` (never trained, cost ``extra_cost``)
    -- each task's loss is the mean of its losses in all pair networks inside the set. Means are
    summed in the order the pairs appear in ``measured``.

    Raises:
        ValueError: two pair networks for the same pair, or a task of a >= 3-task set that appears in
            no pair network inside the set.
    """
    pairs: list[Network] = []
    seen: dict[frozenset[str], Network] = {}
    for n in measured:
        if len(n.tasks) == 2:
            if frozenset(n.tasks) in seen:
                raise ValueError(f"two pair networks for tasks {set(n.tasks)}: {seen[frozenset(n.tasks)].label} and "
                                 f"{n.label}; HOA needs one loss per pair")
            seen[frozenset(n.tasks)] = n
            pairs.append(n)

    def estimate(tasks: tuple[str, ...], cost: float) -> Network:
        members = frozenset(tasks)
        sums = dict.fromkeys(tasks, 0.0)
        counts = dict.fromkeys(tasks, 0)
        for p in pairs:
            if members.issuperset(p.tasks):
                for t in p.tasks:
                    sums[t] += p.losses[t]
                    counts[t] += 1
        missing = [t for t in tasks if counts[t] == 0]
        if missing:
            raise ValueError(f"HOA cannot estimate task {missing[0]!r} in network {'|'.join(tasks)}: no measured "
                             f"pair network inside that set contains it")
        return Network(tasks, cost, {t: sums[t] / counts[t] for t in tasks})

    out = [n if len(n.tasks) <= 2 else estimate(n.tasks, n.cost) for n in measured]
    for s in extra_sets:
        s = tuple(sorted(s)) if isinstance(s, (set, frozenset)) else tuple(s)
        if len(s) < 3:
            raise ValueError(f"extra_sets are for networks of >= 3 tasks, got {list(s)}")
        out.append(estimate(s, extra_cost))
    return out


def esa_networks(early: Sequence[Network], final: Sequence[Network]) -> list[Network]:
    """Early-stopping approximation (Standley et al., Section 3.3): select on ``early`` losses.

    ``early`` holds the losses of networks stopped after a fraction (~20 %) of training. Each must be a
    network of ``final`` (same task set and cost), so that its fully trained losses can be reported;
    ``final`` may hold networks that were not early-evaluated. Returns ``early`` as a list.
    """
    keys = {n.key for n in final}
    for n in early:
        if n.key not in keys:
            raise ValueError(f"early-stopped network {n.label} has no fully trained counterpart")
    return list(early)


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
                    approx: Approx = "optimal", early: Sequence[Network] | None = None, solver: Solver = "search",
                    tie: Tie = "standley", tasks: Sequence[str] | None = None) -> dict[float, dict[str, Any]]:
    """Select at every budget and report the chosen networks' losses (the paper's Figures 2-5).

    ``approx``: "optimal" selects on ``val``; "hoa" on :func:`hoa_networks` of ``val``; "esa" on
    ``early`` (required). The reported total is the sum over tasks of the lowest ``report`` loss among
    the chosen networks (``report=None`` reports ``val``).

    Returns ``{budget: {"networks": [{"tasks": [...], "cost": c}, ...], "total": float}}``.
    """
    report = val if report is None else report
    order = _task_order(val, tasks)
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
    out: dict[float, dict[str, Any]] = {}
    for b in budgets:
        sel = select_networks(cands, b, tasks=order, solver=solver, tie=tie)
        scores = report_scores(sel.networks, report)
        total = 0.0
        for t in order:
            total += scores[t]
        out[float(b)] = {"networks": [n.to_json() for n in sel.networks], "total": total}
    return out


def parse_budgets(spec: str) -> list[float]:
    """Budgets from ``"start:stop:step"`` (stop inclusive), ``"start:stop"`` (step 1), ``"a,b,c"`` or ``"a"``."""
    text = spec.strip()

    def num(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"budget spec {spec!r}: {s!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"budget spec {spec!r}: budgets must be finite and >= 0, got {s!r}")
        return v

    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"budget spec {spec!r}: expected start:stop[:step]")
        start, stop = num(parts[0]), num(parts[1])
        step = num(parts[2]) if len(parts) == 3 else 1.0
        if step <= 0:
            raise ValueError(f"budget spec {spec!r}: step must be > 0")
        if stop < start:
            raise ValueError(f"budget spec {spec!r}: stop {stop:g} is below start {start:g}")
        count = math.floor((stop - start) / step + 1e-9)
        return [round(start + i * step, 12) for i in range(count + 1)]
    if not text:
        raise ValueError("budget spec is empty; expected e.g. '1:5:0.5'")
    return [num(s) for s in text.split(",")]


def select_cli(losses: str, budgets: str | Sequence[float], *, report: str | None = None,
               approx: Approx = "optimal", early: str | None = None, solver: Solver = "search",
               tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Backend of ``taskgrouping select``: read loss files, run :func:`selection_curve`.

    Files are read with :func:`taskgrouping.grouping.standley_io.read_networks` (``.csv`` = plain CSV,
    anything else = Standley's tab-separated results format, whose columns get ``tasks`` as names).
    Returns the JSON document ``{"<budget>": {"networks": [...], "total": <sum of report losses>}}``.
    """
    from taskgrouping.grouping.standley_io import read_networks

    val = read_networks(losses, tasks=tasks)
    rep = read_networks(report, tasks=tasks) if report is not None else None
    ear = read_networks(early, tasks=tasks) if early is not None else None
    for name, table in (("report", rep), ("early", ear)):
        if table is not None and set(table.tasks) != set(val.tasks):
            unknown = sorted(set(table.tasks) ^ set(val.tasks))
            raise ValueError(f"{name} losses name tasks {list(table.tasks)} but the selection losses name "
                             f"{list(val.tasks)} (differ in {unknown})")
    values = parse_budgets(budgets) if isinstance(budgets, str) else [float(b) for b in budgets]
    curve = selection_curve(val.networks, rep.networks if rep else None, values, approx=approx,
                            early=ear.networks if ear else None, solver=solver, tasks=val.tasks)
    return {f"{b:g}": v for b, v in curve.items()}
