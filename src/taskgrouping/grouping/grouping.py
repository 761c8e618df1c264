"""The one result type every grouping searcher returns.

A :class:`Grouping` is a list of task groups, *possibly overlapping* (two-shot methods such as TAG
and Standley's selection may train a task in several networks), plus which group serves each task
at inference. A partition is the special case with no overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Grouping:
    """Task groups and the group serving each task.

    Attributes:
        groups: tuple of groups, each a tuple of task names (order kept as given).
        serves: task name -> index into ``groups``; the serving group must contain the task.
        info: free-form provenance (method, scores, budget, ...), kept JSON-serialisable.
    """

    groups: tuple[tuple[str, ...], ...]
    serves: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        groups = tuple(tuple(g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        if not groups:
            raise ValueError("a grouping needs at least one group")
        for i, g in enumerate(groups):
            if not g:
                raise ValueError(f"group {i} is empty")
            if len(set(g)) != len(g):
                raise ValueError(f"group {i} lists a task twice: {list(g)}")
        members = {t for g in groups for t in g}
        if set(self.serves) != members:
            missing = sorted(members - set(self.serves))
            extra = sorted(set(self.serves) - members)
            raise ValueError(f"serves must name exactly the grouped tasks; missing {missing}, not in any group {extra}")
        for t, k in self.serves.items():
            if not 0 <= k < len(groups) or t not in groups[k]:
                raise ValueError(f"task {t!r} is served by group {k}, which does not contain it")

    @classmethod
    def partition(cls, groups: Sequence[Sequence[str]], **info: Any) -> "Grouping":
        """A grouping in which every task is in exactly one group (empty groups dropped)."""
        groups = [tuple(g) for g in groups if len(g)]
        serves: dict[str, int] = {}
        for k, g in enumerate(groups):
            for t in g:
                if t in serves:
                    raise ValueError(f"task {t!r} is in groups {serves[t]} and {k}; a partition needs one")
                serves[t] = k
        return cls(tuple(groups), serves, dict(info))

    @property
    def tasks(self) -> list[str]:
        return list(self.serves)

    @property
    def is_partition(self) -> bool:
        return sum(len(g) for g in self.groups) == len(self.serves)

    def as_lists(self) -> list[list[str]]:
        return [list(g) for g in self.groups]

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.as_lists(), "serves": dict(self.serves), "info": self.info}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Grouping":
        return cls(tuple(tuple(g) for g in obj["groups"]), {str(k): int(v) for k, v in obj["serves"].items()},
                   dict(obj.get("info", {})))
