"""Options of Standley et al.'s methods ``optimal``, ``hoa`` and ``esa``: one frozen dataclass each,
sharing :class:`StandleyOptions` (fan-out backend, budget, half-size networks, selection solver).

Values are checked on creation; the limits that depend on the number of tasks (``max_tasks``,
HOA's count of estimated networks) in ``check_data``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from taskgrouping.data.base import TaskData
from taskgrouping.methods.options import expect, expect_choice, expect_int, expect_number
from taskgrouping.methods.two_shot import FanoutOptions

__all__ = ["SOLVERS", "HOA_MAX_ESTIMATES", "StandleyOptions", "OptimalOptions", "HOAOptions", "ESAOptions"]

SOLVERS = ("auto", "search", "milp")
#: HOA: most estimated (>= 3-task) candidate networks handed to the selection.
HOA_MAX_ESTIMATES = 100_000


@dataclass(frozen=True)
class StandleyOptions(FanoutOptions):
    """``budget``: total inference cost of the chosen networks, in full-size networks (``None`` = K);
    ``half_size``: also train a half-size (cost 0.5) single-task network per task; ``solver``:
    ``"search"`` (Standley's exact search), ``"milp"`` (HiGHS) or ``"auto"`` (the search up to
    :data:`~taskgrouping.methods.standley.selection.SEARCH_MAX_CANDIDATES` candidates)."""

    budget: float | None = None
    half_size: bool = True
    solver: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        expect_number("budget", self.budget, low=0, low_open=True, allow_none=True)
        expect(isinstance(self.half_size, bool), "half_size", "true or false", self.half_size)
        expect_choice("solver", self.solver, SOLVERS)


@dataclass(frozen=True)
class _AllSubsetsOptions(StandleyOptions):
    """``max_tasks``: most tasks for which all 2^N - 1 task subsets are trained (``None`` = the default)."""

    method: ClassVar[str] = ""
    max_tasks: int | None = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        expect_int("max_tasks", self.max_tasks, low=1, allow_none=True)
        if self.max_tasks is None:
            object.__setattr__(self, "max_tasks", type(self).defaults()["max_tasks"])

    def check_data(self, data: TaskData) -> None:
        n = len(data.task_names)
        if n > self.max_tasks:
            name = self.method
            raise ValueError(f"method {name!r} trains all 2^N - 1 = {2 ** n - 1} task subsets; {n} tasks exceed "
                             f"{name}.max_tasks={self.max_tasks}. Use 'hoa' (N + N(N-1)/2 networks) or raise "
                             f"{name}.max_tasks")


@dataclass(frozen=True)
class OptimalOptions(_AllSubsetsOptions):
    """Options of ``optimal``: every task subset trained fully."""

    method: ClassVar[str] = "optimal"


@dataclass(frozen=True)
class ESAOptions(_AllSubsetsOptions):
    """Options of ``esa``; ``early_fraction``: the fraction of the epochs the candidates train for."""

    method: ClassVar[str] = "esa"
    early_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        expect_number("early_fraction", self.early_fraction, low=0, low_open=True, high=1)


@dataclass(frozen=True)
class HOAOptions(StandleyOptions):
    """Options of ``hoa``; ``max_group_size``: largest estimated network (``None`` = all tasks)."""

    max_group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        expect_int("max_group_size", self.max_group_size, low=1, allow_none=True)

    def largest_group(self, n_tasks: int) -> int:
        """The largest network HOA estimates for ``n_tasks`` tasks."""
        return n_tasks if self.max_group_size is None else min(n_tasks, self.max_group_size)

    def check_data(self, data: TaskData) -> None:
        n = len(data.task_names)
        count = sum(math.comb(n, r) for r in range(3, self.largest_group(n) + 1))
        if count > HOA_MAX_ESTIMATES:
            raise ValueError(f"hoa: {count} estimated networks of >= 3 tasks exceed {HOA_MAX_ESTIMATES}; "
                             "set hoa.max_group_size to bound the size of the estimated networks")
