"""The objects of Standley et al.'s network selection (ICML 2020, Section 3.2): a trained or estimated
:class:`Network` (tasks, inference cost, per-task losses), a partial solution shown to a BETTER rule
(:class:`Candidate`) and a solver's answer (:class:`Selection`).

A network is identified by its task set and its cost, so that the losses of one network can be
looked up across loss files (validation for selecting, test for reporting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from taskgrouping.grouping.grouping import Grouping

__all__ = ["Network", "Candidate", "BetterRule", "Selection", "task_order"]


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


def task_order(networks: Sequence[Network], tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The tasks to serve, in the order losses are summed: ``tasks`` (checked against the networks) or
    the order of first appearance in ``networks``."""
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

