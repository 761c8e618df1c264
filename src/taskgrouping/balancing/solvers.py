"""Small convex problems on task Gramians, solved with SciPy and NumPy (no cvxpy needed).

CAGrad's dual (an exact active-set solve with closed-form steps, SLSQP as the fallback) and
Nash-MTL's bargaining equation (damped Newton). Both work on the Gramian ``G = J J^T`` of the task
gradients (``T x T``), so their cost does not depend on the number of parameters; for 8 tasks
either takes a fraction of a millisecond, which the feature-level surrogate's time budget needs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from taskgrouping.balancing.gramian_weightings import as_gramian


def _as_gramian(gramian: np.ndarray) -> np.ndarray:
    g = as_gramian(gramian)
    return 0.5 * (g + g.T)


def _cagrad_problem(gramian: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The dual's data ``(G / trace, G 1/T, c ||g0||)``, or ``None`` when the mean gradient is the answer."""
    if c < 0:
        raise ValueError(f"CAGrad's c must be >= 0, got {c}")
    g = _as_gramian(gramian)
    t = g.shape[0]
    trace = float(np.trace(g))
    if trace <= 0.0:
        return None
    g = g / trace
    b = g @ np.full(t, 1.0 / t)
    k = c * float(np.sqrt(max(float(b.mean()), 0.0)))
    return None if k == 0.0 else (g, b, k)


def _cagrad_on_support(g: np.ndarray, b: np.ndarray, k: float, idx: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The stationary point of the dual on the face of the simplex spanned by tasks ``idx``.

    On a support ``S`` the conditions ``b_S + k G_SS w_S / s = lam 1`` with ``s = sqrt(w^T G w)``
    and ``sum(w) = 1`` have a closed form: with ``x = G_SS^-1 1``, ``y = G_SS^-1 b_S`` and
    ``r^2 = (1.y)^2 - (1.x)(b_S.y - k^2)``, ``lam = (1.y + r) / 1.x`` and ``w_S = (lam x - y) / r``.
    Returns ``(w_S, lam)``, or ``None`` when there is no such point (``r^2 <= 0``: the objective
    decreases without bound on that face's affine hull) or ``G_SS`` is singular.
    """
    try:
        sol = np.linalg.solve(g[np.ix_(idx, idx)], np.stack([np.ones(idx.size), b[idx]], axis=1))
    except np.linalg.LinAlgError:
        return None
    x, y = sol[:, 0], sol[:, 1]
    sx, sy = float(x.sum()), float(y.sum())
    disc = sy * sy - sx * (float(b[idx] @ y) - k * k)
    if not (sx > 0.0 and disc > 0.0 and np.all(np.isfinite(sol))):
        return None
    r = float(np.sqrt(disc))
    lam = (sy + r) / sx
    return (lam * x - y) / r, lam


def _cagrad_active_set(g: np.ndarray, b: np.ndarray, k: float, support: np.ndarray) -> np.ndarray | None:
    """The dual's minimiser by an active-set search over supports, or ``None`` if none is found.

    From ``support``: a face without a positive stationary point loses a task (the most negative
    weight, or, without a stationary point, the task with the worst vertex value
    ``b_i + k sqrt(G_ii)``); a positive stationary point whose gradient is below ``lam`` at an
    outside task gains the most violating task. The objective is convex, so a point that passes
    these KKT conditions is the global minimiser; the search gives up after ``3 T`` changes.
    """
    t = b.size
    support = support.copy()
    vertex = b + k * np.sqrt(np.clip(np.diag(g), 0.0, None))
    for _ in range(3 * t):
        idx = np.flatnonzero(support)
        if idx.size == 0:
            return None
        found = _cagrad_on_support(g, b, k, idx)
        if found is None:
            support[idx[int(np.argmax(vertex[idx]))]] = False
            continue
        w_s, lam = found
        if not np.all(w_s > 0.0):
            support[idx[int(np.argmin(w_s))]] = False
            continue
        w = np.zeros(t)
        w[idx] = w_s
        gw = g @ w
        grad = b + k * gw / float(np.sqrt(max(float(w @ gw), 1e-300)))
        tol = 1e-9 * max(1.0, abs(lam))
        if np.any(np.abs(grad[idx] - lam) > tol):
            return None  # G_SS too ill-conditioned for the closed form
        slack = np.where(support, 0.0, grad - lam)
        if slack.min() >= -tol:
            return w
        support[int(np.argmin(slack))] = True
    return None


def _cagrad_slsqp(g: np.ndarray, b: np.ndarray, k: float, start: np.ndarray) -> np.ndarray:
    """The dual solved with SLSQP (the authors' solver), from ``start``."""
    t = b.size

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        gw = g @ w
        norm = np.sqrt(max(float(w @ gw), 1e-20))
        return float(w @ b + k * norm), b + k * gw / norm

    res = minimize(objective, start, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                   constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
                   options={"ftol": 1e-12, "maxiter": 200})
    w = np.clip(res.x, 0.0, None)
    return w / w.sum() if w.sum() > 0 else np.full(t, 1.0 / t)


def cagrad_dual(gramian: np.ndarray, c: float, init: np.ndarray | None = None) -> np.ndarray:
    """The simplex weights ``w`` minimising CAGrad's dual (see :func:`cagrad_weights`).

    Solved exactly by an active-set search whose steps have a closed form
    (:func:`_cagrad_active_set`), starting from the support of ``init`` (the last step's solution:
    supports rarely change between steps) or from all tasks, and accepted only when it satisfies
    the KKT conditions. Should the search fail (e.g. a singular Gramian), SLSQP - the authors'
    solver - solves the problem from ``init``.
    """
    problem = _cagrad_problem(gramian, c)
    t = np.asarray(gramian).shape[0]
    if problem is None:
        return np.full(t, 1.0 / t)
    g, b, k = problem
    start = np.full(t, 1.0 / t)
    if init is not None:
        guess = np.clip(np.asarray(init, dtype=np.float64), 0.0, None)
        if guess.shape == (t,) and np.all(np.isfinite(guess)) and guess.sum() > 0:
            start = guess / guess.sum()
    w = _cagrad_active_set(g, b, k, start > 1e-8)
    return _cagrad_slsqp(g, b, k, start) if w is None else w


def cagrad_weights(gramian: np.ndarray, c: float, eps: float = 1e-4, dual: np.ndarray | None = None) -> np.ndarray:
    """Task weights of CAGrad's update ``d = J^T weights`` (Liu et al. 2021, Eq. 3 and its dual).

    CAGrad maximises the worst task improvement ``min_i g_i^T d`` inside the ball
    ``||d - g0|| <= c ||g0||`` around the mean gradient ``g0``. Its dual is a problem on the simplex,
    ``min_w  w^T G 1/T + c ||g0|| sqrt(w^T G w)``, and the primal solution is
    ``d = g0 + c ||g0|| / ||g_w|| * g_w`` with ``g_w = J^T w``. The Gramian is first divided by its
    trace (the weights are scale-invariant; this only conditions the problem). ``dual`` is the
    dual's solution from :func:`cagrad_dual` (solved here when not given).
    """
    problem = _cagrad_problem(gramian, c)
    t = np.asarray(gramian).shape[0]
    mean_w = np.full(t, 1.0 / t)
    if problem is None:
        return mean_w
    g, _, k = problem
    w = cagrad_dual(gramian, c) if dual is None else np.asarray(dual, dtype=np.float64)
    gw_norm = float(np.sqrt(max(float(w @ g @ w), 0.0)))
    return mean_w + (k / (gw_norm + eps)) * w


def nash_mtl_weights(gramian: np.ndarray, init: np.ndarray | None = None, upper: float = 1e6,
                     tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Nash bargaining weights of Nash-MTL (Navon et al. 2022, Eq. 2): ``alpha > 0`` with
    ``G alpha = 1 / alpha`` (elementwise), on ``G`` divided by its Frobenius norm as the authors do.

    That equation is the stationarity condition of the strictly convex
    ``f(alpha) = 1/2 alpha^T G alpha - sum_i log alpha_i`` on ``alpha > 0``, minimised here by
    damped Newton steps (Hessian ``G + diag(1/alpha^2)``, Armijo backtracking). Once the squared
    Newton decrement is below ``tol`` the iterate is in the quadratic-convergence region: one full
    Newton step then reaches the minimiser to rounding, and the solve stops. The authors approximate
    the same fixed point by a sequence of cvxpy problems. ``upper`` bounds each weight: a task whose
    gradient vanishes would otherwise get an infinite one. ``init`` (the last step's weights)
    warm-starts the solve.
    """
    g = _as_gramian(gramian)
    t = g.shape[0]
    norm = float(np.linalg.norm(g))
    if norm <= 0.0:
        return np.ones(t)
    g = g / norm
    a = np.ones(t) if init is None else np.clip(np.asarray(init, dtype=np.float64), 1e-6, upper)
    if a.shape != (t,) or not np.all(np.isfinite(a)):
        a = np.ones(t)

    def f(x: np.ndarray) -> float:
        return float(0.5 * x @ g @ x - np.log(x).sum())

    for _ in range(max_iter):
        grad = g @ a - 1.0 / a
        step = np.linalg.solve(g + np.diag(1.0 / a ** 2), grad)
        decrement = float(grad @ step)
        if decrement < tol:
            if np.all(a - step > 0):
                a = np.clip(a - step, 1e-12, upper)
            break
        size, f0 = 1.0, f(a)
        while size > 1e-12:  # backtracking: stay positive and decrease f (Armijo)
            cand = a - size * step
            if (cand > 0).all() and f(cand) <= f0 - 1e-4 * size * decrement:
                break
            size *= 0.5
        else:
            break  # no decrease left at this precision
        a = np.clip(a - size * step, 1e-12, upper)
    return a


__all__ = ["cagrad_dual", "cagrad_weights", "nash_mtl_weights"]
