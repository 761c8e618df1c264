"""Ranking similarity (Mao et al. 2024): how faithfully an identifier (e.g. FD) orders methods the
way their test performance does. The paper reports |S - 0.5|, whichever direction the
correlation has.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def _as_vector(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"ranking_similarity: {name} must be 1-D (one score or rank per item), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"ranking_similarity: {name} contains NaN or inf")
    return v


def ranking_similarity(a: Any, b: Any) -> float:
    """Fraction of ordered item pairs (i, j), i != j, on which ``a`` and ``b`` order i and j alike.

    ``a`` and ``b`` are per-item scores or ranks in the *same orientation* (compare ranks with
    ranks; negate one vector if its "better" direction is opposite). A pair agrees when
    sign(a_i - a_j) == sign(b_i - b_j); so a tie agrees only with a tie, and a tie in one vector
    against a strict order in the other counts as a disagreement. Without ties this equals
    (1 + Kendall's tau) / 2. 1 = same order, 0 = reversed order, 0.5 = unrelated.
    """
    u, v = _as_vector(a, "a"), _as_vector(b, "b")
    if u.shape != v.shape:
        raise ValueError(f"ranking_similarity: a has {u.size} items but b has {v.size}; expected the same items")
    n = u.size
    if n < 2:
        raise ValueError(f"ranking_similarity needs at least 2 items, got {n}")
    su = np.sign(u[:, None] - u[None, :])
    sv = np.sign(v[:, None] - v[None, :])
    agree = (su == sv) & ~np.eye(n, dtype=bool)
    return float(agree.sum() / (n * (n - 1)))


def ranking_similarity_gap(a: Any, b: Any) -> float:
    """|S - 0.5| with S = :func:`ranking_similarity`: how far from unrelated, in either direction."""
    return abs(ranking_similarity(a, b) - 0.5)


__all__ = ["ranking_similarity", "ranking_similarity_gap"]
