"""Task combinations as ``bool[N]`` masks and as bit codes (bit ``i`` = task ``i``), and the candidate
pools MTG-Net samples from: every combination for small N, a seeded random pool beyond."""

from __future__ import annotations

import numpy as np

__all__ = ["all_subsets", "mask_code", "random_pool"]


def mask_code(mask_row: np.ndarray) -> int:
    """The bit code of a combination given as a bool mask (bit i set = task i present)."""
    return int(sum(1 << int(i) for i in np.flatnonzero(mask_row)))


def all_subsets(n: int) -> np.ndarray:
    """All 2^n - 1 non-empty combinations of n tasks as bool masks, in bit-code order."""
    codes = np.arange(1, 1 << n, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)


def random_pool(n: int, size: int, seed: int) -> np.ndarray:
    """Singles, pairs and random larger combinations (uniform size, then uniform members)."""
    rng = np.random.default_rng(seed)
    rows = {(1 << i) for i in range(n)} | {(1 << i) | (1 << j) for i in range(n) for j in range(i + 1, n)}
    rows.add((1 << n) - 1)
    attempts = 0
    while len(rows) < size and attempts < 50 * size:
        attempts += 1
        r = int(rng.integers(3, n + 1))
        rows.add(int(sum(1 << int(i) for i in rng.choice(n, size=r, replace=False))))
    codes = np.array(sorted(rows), dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)
