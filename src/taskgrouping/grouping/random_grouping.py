"""Random groupings: the baseline every grouping searcher should beat.

:func:`random_partition` draws a partition of the tasks into exactly ``k`` non-empty groups,
**uniformly over the S(N, k) set partitions** (Stirling numbers of the second kind). Equivalently:
uniform over the surjective assignments of tasks to ``k`` labelled groups, with the labels then
forgotten — each set partition corresponds to exactly ``k!`` such assignments.

Sampling is exact (no rejection, so it stays fast for ``k`` close to ``N``): tasks are placed from
last to first using the recurrence ``S(n, k) = k S(n-1, k) + S(n-1, k-1)`` — the last task opens
its own group with probability ``S(n-1, k-1) / S(n, k)``, otherwise joins one of the ``k`` groups of
the remaining tasks uniformly. Integers are exact Python ints, so large ``N`` is fine.

Groups are returned in the order of their first task (in the given task order), members in task
order, so equal partitions compare equal.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Sequence

from taskgrouping.grouping.grouping import Grouping


@lru_cache(maxsize=None)
def stirling2(n: int, k: int) -> int:
    """Stirling number of the second kind: the number of partitions of ``n`` items into ``k`` non-empty blocks."""
    if n < 0 or k < 0:
        raise ValueError(f"stirling2 needs n, k >= 0, got {n}, {k}")
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    # iterative over n to avoid deep recursion for large n
    row = [1] + [0] * k  # S(0, j)
    for m in range(1, n + 1):
        new = [0] * (k + 1)
        for j in range(1, min(m, k) + 1):
            new[j] = j * row[j] + row[j - 1]
        row = new
    return row[k]


def _check(tasks: Sequence[str], k: int) -> list[str]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("random grouping needs at least one task")
    if len(set(tasks)) != len(tasks):
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        raise ValueError(f"task names must be unique; repeated: {dup}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(tasks):
        raise ValueError(f"k must be an integer between 1 and the number of tasks ({len(tasks)}), got {k!r}")
    return tasks


def _draw(tasks: list[str], k: int, rng: random.Random) -> Grouping:
    n = len(tasks)
    labels = [0] * n
    j = k
    # label = rank of the task's group by its smallest member; a task that opens a group while
    # j groups remain for tasks[0..i] gets the last rank j-1 (its group has the largest minimum).
    for i in range(n - 1, -1, -1):
        r = rng.randrange(stirling2(i + 1, j))
        if r < stirling2(i, j - 1):
            labels[i] = j - 1
            j -= 1
        else:
            labels[i] = rng.randrange(j)
    groups = [[t for t, lab in zip(tasks, labels) if lab == g] for g in range(k)]
    return Grouping.partition(groups, method="random", k=k)


def random_partition(tasks: Sequence[str], k: int, seed: int) -> Grouping:
    """One partition of ``tasks`` into exactly ``k`` non-empty groups, uniform over the S(N, k) set
    partitions, determined by ``seed``."""
    tasks = _check(tasks, k)
    g = _draw(tasks, k, random.Random(seed))
    return Grouping(g.groups, g.serves, {**g.info, "seed": seed})


def random_partitions(tasks: Sequence[str], k: int, draws: int, seed: int) -> list[Grouping]:
    """``draws`` independent uniform partitions into exactly ``k`` groups from one seeded stream
    (draw ``i`` is the same for every ``draws > i``)."""
    tasks = _check(tasks, k)
    if not isinstance(draws, int) or draws < 0:
        raise ValueError(f"draws must be a non-negative integer, got {draws!r}")
    rng = random.Random(seed)
    out = []
    for i in range(draws):
        g = _draw(tasks, k, rng)
        out.append(Grouping(g.groups, g.serves, {**g.info, "seed": seed, "draw": i}))
    return out
