"""Small convex problems on task Gramians, solved with SciPy and NumPy (no cvxpy needed).

Both work on the Gramian ``G = J J^T`` of the task gradients (``T x T``), so their cost does not
depend on the number of parameters.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize



def _as_gramian(gramian: np.ndarray) -> np.ndarray:
    g = np.asarray(gramian, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"expected a square Gramian (tasks x tasks), got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("the task Gramian holds NaN or inf; a task loss or gradient is not finite")
    return 0.5 * (g + g.T)


def cagrad_weights(gramian: np.ndarray, c: float, eps: float = 1e-4) -> np.ndarray:
    """Task weights of CAGrad's update ``d = J^T weights`` (Liu et al. 2021, Eq. 3 and its dual).

    CAGrad maximises the worst task improvement ``min_i g_i^T d`` inside the ball
    ``||d - g0|| <= c ||g0||`` around the mean gradient ``g0``. Its dual is a problem on the simplex,
    ``min_w  w^T G 1/T + c ||g0|| sqrt(w^T G w)``, and the primal solution is
    ``d = g0 + c ||g0|| / ||g_w|| * g_w`` with ``g_w = J^T w``. The Gramian is first divided by its
    trace (the weights are scale-invariant; this only conditions the problem), then the dual is
    solved with SLSQP, as the authors' code does.
    """
    if c < 0:
        raise ValueError(f"CAGrad's c must be >= 0, got {c}")
    g = _as_gramian(gramian)
    t = g.shape[0]
    trace = float(np.trace(g))
    mean_w = np.full(t, 1.0 / t)
    if trace <= 0.0:
        return mean_w
    g = g / trace
    b = g @ mean_w
    g0_norm = float(np.sqrt(max(mean_w @ b, 0.0)))
    k = c * g0_norm
    if k == 0.0:
        return mean_w

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        gw = g @ w
        norm = np.sqrt(max(float(w @ gw), 1e-20))
        return float(w @ b + k * norm), b + k * gw / norm

    res = minimize(objective, mean_w, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                   constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
                   options={"ftol": 1e-12, "maxiter": 200})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else mean_w
    gw_norm = float(np.sqrt(max(w @ g @ w, 0.0)))
    return mean_w + (k / (gw_norm + eps)) * w


def nash_mtl_weights(gramian: np.ndarray, init: np.ndarray | None = None, upper: float = 1e6,
                     tol: float = 1e-20, max_iter: int = 100) -> np.ndarray:
    """Nash bargaining weights of Nash-MTL (Navon et al. 2022, Eq. 2): ``alpha > 0`` with
    ``G alpha = 1 / alpha`` (elementwise), on ``G`` divided by its Frobenius norm as the authors do.

    That equation is the stationarity condition of the strictly convex
    ``f(alpha) = 1/2 alpha^T G alpha - sum_i log alpha_i`` on ``alpha > 0``, minimised here by
    damped Newton steps (Hessian ``G + diag(1/alpha^2)``; stop when the Newton decrement squared is
    below ``tol``). The authors approximate the same fixed point by a sequence of cvxpy problems.
    ``upper`` bounds each weight: a task whose gradient vanishes would otherwise get an infinite one.
    """
    g = _as_gramian(gramian)
    t = g.shape[0]
    norm = float(np.linalg.norm(g))
    if norm <= 0.0:
        return np.ones(t)
    g = g / norm
    a = np.ones(t) if init is None else np.clip(np.asarray(init, dtype=np.float64), 1e-6, upper)

    def f(x: np.ndarray) -> float:
        return float(0.5 * x @ g @ x - np.log(x).sum())

    for _ in range(max_iter):
        grad = g @ a - 1.0 / a
        step = np.linalg.solve(g + np.diag(1.0 / a ** 2), grad)
        if float(grad @ step) < tol:
            break
        size, f0 = 1.0, f(a)
        while size > 1e-12:  # backtracking: stay positive and decrease f (Armijo)
            cand = a - size * step
            if (cand > 0).all() and f(cand) <= f0 - 1e-4 * size * float(grad @ step):
                break
            size *= 0.5
        a = np.clip(a - size * step, 1e-12, upper)
    return a


__all__ = ["cagrad_weights", "nash_mtl_weights"]
