"""PCGrad, GradVac and MGDA task weights computed from the task Gramian with Python floats.

Each maps the Gramian ``G = J J^T`` of the task gradients (``T x T``) to task weights ``w``; the
update is ``w @ J``. They are the algorithms of TorchJD's ``PCGradWeighting``,
``GradVacWeighting`` and ``MGDAWeighting`` (TorchJD 0.18), step for step, with the same random
draws from the global torch RNG (``torch.randperm``, one call per task, as TorchJD makes them), so
equal seeds give equal weights; ``tests/balancing/test_balancers_torchjd.py`` pins the equality.

Why hand-written: TorchJD loops over per-pair torch *scalar* operations, which on a CPU cost 1 ms
(MGDA) to 8 ms (GradVac) per step for 8 tasks, more than the feature-level surrogate's whole budget
(<= 1.2 x an EW step); the same loops on Python floats and a float64 Gramian take microseconds.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def as_gramian(gramian: np.ndarray) -> np.ndarray:
    """``gramian`` as a float64 ``T x T`` array; a clear error for a non-square or non-finite one."""
    g = np.asarray(gramian, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"expected a square task Gramian (tasks x tasks), got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("the task Gramian holds NaN or inf; a task loss or gradient is not finite")
    return g


def pcgrad_weights(gramian: np.ndarray) -> np.ndarray:
    """PCGrad (Yu et al. 2020, Alg. 1) in Gramian form.

    ``g_i^PC = sum_k c_ik g_k`` starts as ``g_i``; for each other task ``j`` in a random order, if
    ``g_i^PC . g_j < 0`` it is projected on the normal plane of ``g_j`` (``c_ij -= g_i^PC . g_j /
    |g_j|^2``). The weights are ``sum_i c_i``. One ``torch.randperm(T)`` per task, as TorchJD draws.
    """
    rows = as_gramian(gramian).tolist()
    t = len(rows)
    weights = [0.0] * t
    for i in range(t):
        order = torch.randperm(t).tolist()
        coef = [0.0] * t
        coef[i] = 1.0
        for j in order:
            if j == i:
                continue
            inner = sum(a * b for a, b in zip(rows[j], coef))
            if inner < 0.0:
                coef[j] -= inner / rows[j][j]
        weights = [w + c for w, c in zip(weights, coef)]
    return np.asarray(weights)


class GradVacWeights:
    """Gradient Vaccine (Wang et al. 2021, Alg. 1) in Gramian form, with its EMA state.

    For task ``i`` and each other task ``j`` in a random order, the cosine ``phi_ij`` between the
    (already corrected) ``g_i^PC`` and ``g_j`` is compared with the EMA target ``phi_hat_ij``; when
    below, ``g_j`` is added with the closed-form coefficient that lifts the cosine to the target
    (their Eq. 3); then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij``. The weights are the
    column sums of the coefficients. The targets start at zero and are reset when the number of
    tasks changes. One ``torch.randperm(T - 1)`` per task, as TorchJD draws.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac's beta must be in [0, 1], got {beta}")
        if eps < 0.0:
            raise ValueError(f"GradVac's eps must be >= 0, got {eps}")
        self.beta, self.eps = float(beta), float(eps)
        self.phi: np.ndarray | None = None

    def __call__(self, gramian: np.ndarray) -> np.ndarray:
        rows = as_gramian(gramian).tolist()
        m = len(rows)
        if self.phi is None or self.phi.shape != (m, m):
            self.phi = np.zeros((m, m))
        phi = self.phi.tolist()
        beta, eps = self.beta, self.eps
        norms = [math.sqrt(max(rows[j][j], 0.0)) for j in range(m)]
        weights = [0.0] * m
        for i in range(m):
            coef = [0.0] * m
            coef[i] = 1.0
            dots = list(rows[i])  # g_i^PC . g_k for every k
            norm_sq = rows[i][i]  # |g_i^PC|^2
            others = [j for j in range(m) if j != i]
            for idx in torch.randperm(m - 1).tolist():
                j = others[idx]
                norm_i, norm_j = math.sqrt(max(norm_sq, 0.0)), norms[j]
                dot = dots[j]
                cos = dot / (norm_i * norm_j + eps)
                target = phi[i][j]
                if cos < target:
                    root_cos = math.sqrt(max(1.0 - cos * cos, 0.0))
                    root_target = math.sqrt(max(1.0 - target * target, 0.0))
                    w = norm_i * (target * root_cos - cos * root_target) / (norm_j * root_target + eps)
                    coef[j] += w
                    norm_sq += 2.0 * w * dot + w * w * rows[j][j]
                    dots = [d + w * g for d, g in zip(dots, rows[j])]
                phi[i][j] = (1.0 - beta) * target + beta * cos
            weights = [a + c for a, c in zip(weights, coef)]
        self.phi = np.asarray(phi)
        return np.asarray(weights)

    def state(self) -> dict[str, list | None]:
        return {"phi": None if self.phi is None else self.phi.tolist()}

    def load_state(self, state: dict) -> None:
        phi = state.get("phi")
        if phi is None:
            self.phi = None
            return
        try:
            arr = np.asarray(phi, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"GradVac state 'phi' must be a square matrix of numbers ({exc})") from None
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"GradVac state 'phi' must be a square matrix, got shape {arr.shape}")
        self.phi = arr


def mgda_weights(gramian: np.ndarray, epsilon: float = 1e-3, max_iters: int = 100) -> np.ndarray:
    """MGDA's min-norm point of the convex hull of the task gradients, by the Frank-Wolfe solver of
    Sener & Koltun 2018 (Alg. 2): from uniform weights, move towards the task ``t`` with the
    smallest ``(G alpha)_t`` by the exact line-search step ``gamma``; stop when ``gamma < epsilon``
    or after ``max_iters`` steps. Weights sum to one."""
    if epsilon <= 0:
        raise ValueError(f"MGDA's epsilon must be > 0, got {epsilon}")
    if max_iters < 1:
        raise ValueError(f"MGDA's max_iters must be >= 1, got {max_iters}")
    g = as_gramian(gramian)
    t = g.shape[0]
    alpha = np.full(t, 1.0 / t)
    for _ in range(max_iters):
        g_alpha = g @ alpha
        s = int(np.argmin(g_alpha))
        a, b, c = float(g_alpha[s]), float(alpha @ g_alpha), float(g[s, s])
        if c <= a:
            gamma = 1.0
        elif b <= a:
            gamma = 0.0
        else:
            gamma = (b - a) / (b + c - 2.0 * a)
        alpha = (1.0 - gamma) * alpha
        alpha[s] += gamma
        if gamma < epsilon:
            break
    return alpha


__all__ = ["as_gramian", "pcgrad_weights", "GradVacWeights", "mgda_weights"]
