"""MTG-Net's grouping search: at most K groups chosen from per-task gains of candidate combinations
(measured or predicted). A partition maximising the total gain (exact memoised search over partitions,
or a set-partitioning MILP), the authors' overlapping network-selection form (the shared
:func:`taskgrouping.grouping.cover.best_cover`), or, when combinations cannot be enumerated, a beam
search merging groups."""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Callable, Literal, Sequence

import numpy as np

from taskgrouping.grouping.cover import best_cover
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.mtg_net.masks import mask_code

__all__ = ["beam_partition_search", "partition_solver", "search_groups"]


def _with_singletons(masks: np.ndarray, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = masks.shape[1]
    have = {mask_code(m) for m in masks}
    add = [i for i in range(n) if (1 << i) not in have]
    if not add:
        return masks, gains
    eye = np.eye(n, dtype=bool)[add]
    return np.vstack([masks, eye]), np.vstack([gains, np.zeros((len(add), n))])


def partition_solver(codes: Sequence[int], totals: Sequence[float], n: int
                      ) -> Callable[[int, int], tuple[float, tuple[int, ...]]]:
    """Memoised exact partition search over candidate blocks (bit codes with their totals).

    The returned ``best(remaining, left)`` gives the largest total of a partition of the task set
    ``remaining`` (a bit code) into at most ``left`` candidate blocks and the chosen candidates'
    indices (``-inf`` when none exists); each block is the one holding the lowest remaining task,
    so every partition is visited once.
    """
    by_lowest: list[list[tuple[int, float, int]]] = [[] for _ in range(n)]
    for i, (code, tot) in enumerate(zip(codes, totals)):
        low = (code & -code).bit_length() - 1
        by_lowest[low].append((code, float(tot), i))
    for lst in by_lowest:  # deterministic preference: larger total first, then earlier row
        lst.sort(key=lambda e: (-e[1], e[2]))

    @lru_cache(maxsize=None)
    def best(remaining: int, left: int) -> tuple[float, tuple[int, ...]]:
        if remaining == 0:
            return 0.0, ()
        if left <= 0:
            return -math.inf, ()
        low = (remaining & -remaining).bit_length() - 1
        top, choice = -math.inf, ()
        for code, tot, i in by_lowest[low]:
            if code & ~remaining:
                continue
            val, rest = best(remaining & ~code, left - 1)
            if val + tot > top:
                top, choice = val + tot, (i,) + rest
        return top, choice

    return best


def _partition_exhaustive(masks: np.ndarray, totals: np.ndarray, k: int) -> list[int]:
    """Exact best partition into <= k candidate blocks, by memoised search over exact covers."""
    n = masks.shape[1]
    value, chosen = partition_solver([mask_code(m) for m in masks], totals, n)((1 << n) - 1, k)
    if value == -math.inf:
        raise ValueError(f"no partition of the tasks into at most {k} candidate groups exists")
    return list(chosen)


def _partition_milp(masks: np.ndarray, totals: np.ndarray, k: int) -> list[int]:
    """Set-partitioning integer program: pick candidates covering every task exactly once, <= k."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    m, n = masks.shape
    a = np.vstack([masks.T.astype(float), np.ones((1, m))])
    lb = np.concatenate([np.ones(n), [1.0]])
    ub = np.concatenate([np.ones(n), [float(k)]])
    res = milp(-np.asarray(totals, float), constraints=LinearConstraint(a, lb, ub),
               integrality=np.ones(m), bounds=Bounds(0, 1))
    if res.x is None:
        raise ValueError(f"no partition of the tasks into at most {k} candidate groups exists ({res.message})")
    return np.flatnonzero(res.x > 0.5).tolist()


def search_groups(tasks: Sequence[str], masks: np.ndarray, gains: np.ndarray, k: int, *,
                  overlap: bool = False, method: Literal["auto", "exhaustive", "milp", "local"] = "auto",
                  exhaustive_max_tasks: int = 12) -> Grouping:
    """Choose at most ``k`` groups among candidate combinations from their per-task gains.

    Args:
        tasks: names of the mask columns.
        masks: ``bool[M, N]`` candidate groups; singletons are always available with gain 0.
        gains: ``float[M, N]`` gain of each member task in each candidate (measured or predicted).
        k: largest number of groups; each group costs 1.
        overlap: ``False`` (default) = a partition maximising the total gain
            ``sum_groups sum_{t in group} gain(group, t)``. ``True`` = the network-selection form of
            the MTG-Net authors' search: groups may overlap, every task must be covered, each task
            counts its best gain among the chosen groups and is served by that group.
        method: partition: ``"exhaustive"`` = exact memoised search over all partitions built from
            the candidates (used for ``N <= exhaustive_max_tasks``), ``"milp"`` = set-partitioning
            integer program (SciPy HiGHS). Overlap: exhaustive over combinations, facility-location
            MILP, or beam + swap local search for large pools such as MIMIC's 3,185 combinations
            (:func:`taskgrouping.grouping.cover.best_cover`; ``"auto"`` chooses by size).

    Returns:
        a :class:`Grouping` (groups in the order chosen; tasks in column order) whose ``info`` holds
        ``objective`` (total gain under ``gains``) and ``group_gains``.
    """
    tasks = list(tasks)
    n = len(tasks)
    masks = np.asarray(masks, dtype=bool)
    gains = np.asarray(gains, dtype=np.float64)
    if masks.ndim != 2 or masks.shape[1] != n or masks.shape != gains.shape:
        raise ValueError(f"masks and gains must both be [M, {n}] for tasks {tasks}; got {masks.shape} and {gains.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    if not masks.any(axis=1).all():
        raise ValueError(f"candidate row {int(np.flatnonzero(~masks.any(axis=1))[0])} selects no task")
    gains = np.where(masks, gains, 0.0)
    gains[masks.sum(axis=1) == 1] = 0.0
    masks, gains = _with_singletons(masks, gains)
    if overlap:
        scores = np.where(masks, gains, -np.inf)
        chosen, solver = best_cover(scores, int(k), method=method)
        sub = scores[chosen]
        best = sub.argmax(axis=0)
        used = sorted(set(best.tolist()))
        rows = [chosen[u] for u in used]
        serves = {tasks[t]: used.index(int(best[t])) for t in range(n)}
        objective = float(sub[best, np.arange(n)].sum())
    else:
        totals = gains.sum(axis=1)
        solver = method
        if solver == "auto":
            solver = "exhaustive" if n <= exhaustive_max_tasks else "milp"
        if solver == "exhaustive":
            rows = _partition_exhaustive(masks, totals, int(k))
        elif solver == "milp":
            rows = _partition_milp(masks, totals, int(k))
        else:
            raise ValueError(f"a partition search takes method 'auto', 'exhaustive' or 'milp', got {method!r}")
        serves = {tasks[t]: g for g, r in enumerate(rows) for t in np.flatnonzero(masks[r])}
        objective = float(totals[rows].sum())
    groups = tuple(tuple(tasks[t] for t in np.flatnonzero(masks[r])) for r in rows)
    group_gains = [float(gains[r][masks[r]].sum()) for r in rows]
    return Grouping(groups, serves, {"k": int(k), "overlap": overlap, "solver": solver,
                                     "objective": objective, "group_gains": group_gains})


def beam_partition_search(tasks: Sequence[str], gain_fn: Callable[[np.ndarray], np.ndarray], k: int, *,
                          beam_width: int = 8) -> Grouping:
    """Approximate best partition into <= ``k`` groups when combinations cannot be enumerated.

    Starts from all singletons and repeatedly merges two groups, keeping the ``beam_width`` best
    partitions per level (scored by ``gain_fn``: ``bool[B, N]`` masks -> ``float[B, N]`` per-task
    gains, e.g. the meta-learner's predictions). Merging continues down to one group; the best
    partition seen with at most ``k`` groups is returned.
    """
    tasks = list(tasks)
    n = len(tasks)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    cache: dict[int, float] = {(1 << i): 0.0 for i in range(n)}

    def totals(codes: list[int]) -> None:
        new = sorted({c for c in codes if c not in cache})
        if new:
            masks = ((np.array(new, dtype=np.int64)[:, None] >> np.arange(n)) & 1).astype(bool)
            g = np.asarray(gain_fn(masks), dtype=np.float64)
            for c, row, mask in zip(new, g, masks):
                cache[c] = float(row[mask].sum())

    beam: list[tuple[float, tuple[int, ...]]] = [(0.0, tuple(1 << i for i in range(n)))]
    best: tuple[float, tuple[int, ...]] | None = beam[0] if n <= k else None
    while len(beam[0][1]) > 1:
        moves = []
        for _, parts in beam:
            for a, b in itertools.combinations(range(len(parts)), 2):
                moves.append((parts, a, b, parts[a] | parts[b]))
        totals([mv[3] for mv in moves])
        scored: dict[tuple[int, ...], float] = {}
        for parts, a, b, merged in moves:
            new = tuple(sorted([p for i, p in enumerate(parts) if i not in (a, b)] + [merged]))
            if new not in scored:
                scored[new] = sum(cache[p] for p in new)
        beam = sorted(((v, p) for p, v in scored.items()), key=lambda e: (-e[0], e[1]))[:beam_width]
        if len(beam[0][1]) <= k and (best is None or beam[0][0] > best[0]):
            best = beam[0]
    assert best is not None
    value, parts = best
    parts = sorted(parts, key=lambda c: c & -c)  # groups ordered by their first task
    groups = [tuple(tasks[t] for t in range(n) if (p >> t) & 1) for p in parts]
    return Grouping.partition(groups, k=int(k), overlap=False, objective=float(value),
                              group_gains=[cache[p] for p in parts])
