"""Choosing at most k networks that cover every task: the selection step shared by TAG's and
MTG-Net's overlapping groupings (a facility-location problem), solved exactly by enumeration or
SciPy's HiGHS MILP, or heuristically by beam search and swaps."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np

__all__ = ["best_cover"]


def _exhaustive(scores: np.ndarray, k: int) -> list[int]:
    """Best set of <= k rows of ``scores``; fewer rows win ties, then the earliest combination."""
    m, n = scores.shape
    best_val, best = -np.inf, [0]
    for size in range(1, min(k, m) + 1):
        combos = np.array(list(itertools.combinations(range(m), size)), dtype=np.int64)
        for start in range(0, len(combos), 20000):
            chunk = combos[start:start + 20000]
            value = scores[chunk].max(axis=1).mean(axis=1)  # [combos]; -inf when a task is uncovered
            j = int(np.argmax(value))
            if value[j] > best_val:
                best_val, best = float(value[j]), chunk[j].tolist()
    return best


def _milp(scores: np.ndarray, k: int) -> list[int]:
    """Facility-location integer program: open <= k rows, serve each column by one open row."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    m, n = scores.shape
    pairs = np.argwhere(np.isfinite(scores))  # (group, task) pairs that may serve
    p = len(pairs)
    # variables: y_0..y_{m-1} (group opened), then x_p (pair p serves)
    c = np.concatenate([np.zeros(m), -scores[pairs[:, 0], pairs[:, 1]] / n])
    rows, cols, vals = [], [], []
    # each task served exactly once
    rows += pairs[:, 1].tolist(); cols += (m + np.arange(p)).tolist(); vals += [1.0] * p
    # x_p - y_g <= 0
    r0 = n
    rows += (r0 + np.arange(p)).tolist() * 2
    cols += (m + np.arange(p)).tolist() + pairs[:, 0].tolist()
    vals += [1.0] * p + [-1.0] * p
    # sum y <= k
    rows += [r0 + p] * m; cols += list(range(m)); vals += [1.0] * m
    a = coo_matrix((vals, (rows, cols)), shape=(n + p + 1, m + p)).tocsr()
    lb = np.concatenate([np.ones(n), np.full(p, -np.inf), [-np.inf]])
    ub = np.concatenate([np.ones(n), np.zeros(p), [k]])
    res = milp(c, constraints=LinearConstraint(a, lb, ub), integrality=np.ones(m + p),
               bounds=Bounds(0, 1))
    if res.x is None:
        raise RuntimeError(f"group selection MILP failed: {res.message}")
    served_by = pairs[np.round(res.x[m:]) > 0.5][:, 0]
    return sorted(set(served_by.tolist()))


def _local_search(scores: np.ndarray, k: int, beam_width: int = 16) -> list[int]:
    """Beam-greedy construction then best-improvement swaps (a heuristic for large candidate sets).

    An uncovered task counts a penalty below any achievable score difference, so covering every
    task comes first (as the "large constant" of Standley's search does).
    """
    m, n = scores.shape
    finite = np.isfinite(scores)
    lo, hi = scores[finite].min(), scores[finite].max()
    uncovered = lo - (hi - lo + 1.0) * n
    s = np.where(finite, scores, uncovered)

    def gains_with(base: np.ndarray) -> np.ndarray:
        return np.maximum(s, base).sum(axis=1)

    beam: list[tuple[float, tuple[int, ...], np.ndarray]] = [(uncovered * n, (), np.full(n, uncovered))]
    for _ in range(min(k, m)):
        expanded: dict[frozenset, tuple[float, tuple[int, ...], np.ndarray]] = {}
        for _, chosen, base in beam:
            vals = gains_with(base)
            vals[list(chosen)] = -np.inf
            for g in np.argsort(-vals, kind="stable")[:beam_width]:
                key = frozenset(chosen + (int(g),))
                if key not in expanded:
                    expanded[key] = (float(vals[g]), chosen + (int(g),), np.maximum(base, s[g]))
        beam = sorted(expanded.values(), key=lambda e: (-e[0], sorted(e[1])))[:beam_width]

    def improve(chosen: list[int]) -> tuple[float, list[int]]:
        current = float(s[chosen].max(axis=0).sum())
        for _ in range(100 * k):
            best_gain, best_move = 1e-12 * max(1.0, abs(current)), None
            for i in range(len(chosen)):
                others = chosen[:i] + chosen[i + 1:]
                base = s[others].max(axis=0) if others else np.full(n, uncovered)
                vals = gains_with(base)
                vals[chosen] = -np.inf
                j = int(np.argmax(vals))
                if vals[j] - current > best_gain:
                    best_gain, best_move = vals[j] - current, (i, j)
            if best_move is None:
                break
            chosen[best_move[0]] = best_move[1]
            current = float(s[chosen].max(axis=0).sum())
        return current, chosen

    results = [improve(list(chosen)) for _, chosen, _ in beam]
    return sorted(max(results, key=lambda r: r[0])[1])


def best_cover(scores: np.ndarray, k: int, *,
               method: Literal["auto", "exhaustive", "milp", "local"] = "auto",
               max_exhaustive: int = 200_000, max_milp_pairs: int = 20_000) -> tuple[list[int], str]:
    """Choose at most ``k`` rows of ``scores[group, task]`` maximising the mean over tasks of the
    best chosen score (``-inf`` = the group cannot serve that task).

    This is the network-selection problem shared by TAG and MTG-Net's overlapping search.

    * ``"exhaustive"`` enumerates all combinations of 1..k rows (fewer rows win exact ties);
    * ``"milp"`` solves the facility-location integer program (binary "row used" and "row serves
      task" variables, one server per task, at most ``k`` rows) with SciPy's HiGHS — exact;
    * ``"local"`` is a heuristic: beam-greedy construction (width 16) then best-improvement swaps;
    * ``"auto"``: exhaustive when there are at most ``max_exhaustive`` combinations, else the MILP
      when it has at most ``max_milp_pairs`` (row, task) serving pairs, else local search.

    Returns ``(chosen row indices sorted, solver used)``.
    """
    m = scores.shape[0]
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    if not np.isfinite(scores).any(axis=0).all():
        bad = np.flatnonzero(~np.isfinite(scores).any(axis=0)).tolist()
        raise ValueError(f"no candidate group can serve task columns {bad}")
    if method == "auto":
        n_combos = sum(math.comb(m, s) for s in range(1, min(k, m) + 1))
        if n_combos <= max_exhaustive:
            method = "exhaustive"
        else:
            method = "milp" if int(np.isfinite(scores).sum()) <= max_milp_pairs else "local"
    if method == "exhaustive":
        return sorted(_exhaustive(scores, int(k))), method
    if method == "milp":
        return sorted(_milp(scores, int(k))), method
    if method == "local":
        return _local_search(scores, int(k)), method
    raise ValueError(f"method must be 'auto', 'exhaustive', 'milp' or 'local', got {method!r}")
