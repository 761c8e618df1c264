"""TAG's group selection (Fifty et al., NeurIPS 2021, Section 3.2): from an affinity table, choose at
most ``k`` task groups that cover every task, *overlap allowed*, maximising the mean over tasks of
each task's best score; a task's score in a group is the mean affinity onto it from the other
members, and each task is served by its best chosen group. The cover search itself is
:func:`taskgrouping.grouping.cover.best_cover`.
"""

from __future__ import annotations

import itertools
from typing import Literal, Sequence

import numpy as np

from taskgrouping.grouping.cover import best_cover
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.tag.affinity_table import AffinityLike, as_matrix

__all__ = ["MAX_SELECTION_TASKS", "select_groups"]

#: Above this many tasks the candidate set (all subsets) is too large to enumerate.
MAX_SELECTION_TASKS = 16


def _candidate_scores(mat: np.ndarray) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """All subsets of size >= 2 (size-major, lexicographic) and their per-task scores.

    ``scores[g, t]`` = mean affinity onto ``t`` from the other members of group ``g``; ``-inf``
    when ``t`` is not in ``g``.
    """
    n = mat.shape[0]
    groups = [c for r in range(2, n + 1) for c in itertools.combinations(range(n), r)]
    scores = np.full((len(groups), n), -np.inf)
    diag = np.diag(mat)
    for gi, g in enumerate(groups):
        idx = list(g)
        onto = mat[idx][:, idx].sum(axis=0) - diag[idx]
        scores[gi, idx] = onto / (len(g) - 1)
    return groups, scores


def select_groups(affinity: AffinityLike, tasks: Sequence[str] | None, k: int, *,
                  method: Literal["auto", "exhaustive", "milp", "local"] = "auto",
                  max_exhaustive: int = 200_000, max_milp_pairs: int = 200_000) -> Grouping:
    """Choose at most ``k`` (possibly overlapping) task groups from an affinity table.

    Args:
        affinity: either the file form ``{recipient: {source: value}}`` (``tasks`` may then pick a
            subset, or be ``None`` for all), or a square matrix ``A[source, recipient]`` whose rows
            are named by ``tasks`` in order.
        tasks: task names (see above).
        k: the largest number of groups (networks) allowed.
        method: ``"exhaustive"`` enumerates every combination of <= k candidate groups;
            ``"milp"`` solves the equivalent facility-location integer program with SciPy's HiGHS;
            ``"local"`` is a beam + swap heuristic; ``"auto"`` picks as :func:`best_cover` does
            (exhaustive, else the exact MILP up to ``max_milp_pairs`` serving pairs — every TAG
            problem up to 14 tasks —, else local search).

    Rules (TAG's network selection):
        * candidate groups are all subsets of >= 2 tasks; a task's score in group ``g`` is the mean
          of ``A[s, t]`` over the other members ``s`` of ``g`` (the diagonal is never used);
        * singletons are never candidates when there are >= 2 tasks: a singleton has no
          "other members", we define its score as ``-inf``, and since groups may overlap the
          all-task group always covers every task at a finite score, so a singleton can never win.
          With a single task the result is that task alone;
        * maximise the mean over tasks of each task's best score among the chosen groups;
          each task is served by its best chosen group (ties: the earlier group);
        * the exhaustive search prefers fewer groups on exact ties; groups serving no task are dropped.

    Returns:
        a :class:`Grouping` (overlap allowed), groups listed in task order, with
        ``info = {"method": "tag", "k": k, "score": objective, "task_scores": {...}}``.
    """
    names, mat = as_matrix(affinity, tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    n = len(names)
    if n == 1:
        return Grouping(((names[0],),), {names[0]: 0}, {"method": "tag", "k": int(k), "score": 0.0})
    if n > MAX_SELECTION_TASKS:
        raise ValueError(f"TAG selection enumerates all {2 ** n} task subsets; {n} tasks exceed the limit of "
                         f"{MAX_SELECTION_TASKS}")
    groups, scores = _candidate_scores(mat)
    # candidate order = size, then lexicographic in task order
    chosen, method = best_cover(scores, int(k), method=method, max_exhaustive=max_exhaustive,
                                max_milp_pairs=max_milp_pairs)
    sub = scores[chosen]  # [chosen, N]
    best = sub.argmax(axis=0)  # first maximum = earlier group on ties
    used = sorted(set(best.tolist()))
    remap = {g: i for i, g in enumerate(used)}
    out_groups = tuple(tuple(names[t] for t in groups[chosen[g]]) for g in used)
    serves = {names[t]: remap[int(best[t])] for t in range(n)}
    task_scores = {names[t]: float(sub[best[t], t]) for t in range(n)}
    return Grouping(out_groups, serves, {
        "method": "tag", "k": int(k), "solver": method,
        "score": float(np.mean(list(task_scores.values()))), "task_scores": task_scores,
    })
