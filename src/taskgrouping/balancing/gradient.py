"""Gradient surgery and aggregation methods (Mao et al. 2024's and InterroGate's baselines).

Every class here is a :class:`~taskgrouping.balancing.jacobian.GradientBalancer`: it sees the task
Jacobian at parameter level or, with ``feature_level=True``, at feature level (see that module for
the two levels and the ``feature_reduction`` / ``head_grads`` choices). Scales are those of the
papers (and of TorchJD): MGDA, CAGrad and Aligned-MTL weights sum to one, EW / PCGrad / GradDrop /
GradVac add full gradients, RGW's random weights are scaled to sum to ``T`` like RLW's.

Registered names: ``ew``, ``pcgrad``, ``gradvac``, ``graddrop``, ``rgw``, ``mgda``, ``mgda_ub``,
``cagrad``, ``nash_mtl``, ``aligned_mtl``, ``aligned_mtl_ub``, ``imtl``, ``cosreg``.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from taskgrouping.balancing.base import Balancer, register_balancer
from taskgrouping.balancing.gramian_weightings import GradVacWeights, mgda_weights, pcgrad_weights
from taskgrouping.balancing.jacobian import GradientBalancer, check_losses, task_feature_grads
from taskgrouping.balancing.solvers import cagrad_dual, cagrad_weights, nash_mtl_weights
from taskgrouping.balancing.torchjd_adapter import SOLVERS_HINT, TorchJDNashMTL, TorchJDWeights, cvxpy_available
from taskgrouping.balancing.weighting import TaskSpec, TaskVector

Solver = Literal["scipy", "cvxpy"]


def _tensor(value: Any, name: str, who: str) -> Tensor:
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"balancer {who!r}: state entry {name!r} is not a list of numbers ({exc})") from None


@register_balancer("ew")
class EqualWeighting(GradientBalancer):
    """Equal weighting: the gradient of ``sum_t L_t``.

    At parameter level this is one plain backward (no per-task gradients). At feature level it
    runs the surrogate machinery with unit weights, which must give the same gradients - a check
    of that machinery, and the EW reference for feature-level timings.
    """

    name = "ew"

    def __init__(self, feature_level: bool = False, feature_reduction: str = "sample",
                 head_grads: str = "unweighted") -> None:
        super().__init__(feature_level, feature_reduction, head_grads)
        self.needs_grads = self.feature_level

    def weights(self, jacobian: Tensor) -> Tensor:
        return torch.ones(jacobian.shape[0], dtype=jacobian.dtype, device=jacobian.device)

    def backward(self, losses, shared_params, features=None):
        if self.feature_level:
            return super().backward(losses, shared_params, features)
        check_losses(losses, self.name)
        return Balancer.backward(self, losses, shared_params, features)


class _TorchJDGramian(GradientBalancer):
    """A method whose task weights come from a TorchJD weighting (see ``torchjd_adapter``)."""

    torchjd_name = ""

    def __init__(self, feature_level: bool = False, feature_reduction: str = "sample",
                 head_grads: str = "unweighted", torchjd_options: dict[str, Any] | None = None) -> None:
        super().__init__(feature_level, feature_reduction, head_grads)
        self._weighting = TorchJDWeights(self.torchjd_name, **(torchjd_options or {}))

    def weights(self, jacobian: Tensor) -> Tensor:
        return self._weighting(jacobian)


def _gramian(jacobian: Tensor) -> np.ndarray:
    """``J J^T`` in float64 on the CPU (``T x T``, whatever the level)."""
    j = jacobian.detach().double()
    return (j @ j.T).cpu().numpy()


class _GramianBalancer(GradientBalancer):
    """A method whose task weights are a function of the task Gramian ``J J^T`` (and its own state),
    computed in float64 NumPy."""

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        raise TypeError(f"balancer {self.name!r} does not define gramian_weights()")

    def weights(self, jacobian: Tensor) -> Tensor:
        w = self.gramian_weights(_gramian(jacobian))
        return torch.as_tensor(w, dtype=jacobian.dtype, device=jacobian.device)


@register_balancer("pcgrad")
class PCGrad(_GramianBalancer):
    """PCGrad (Yu et al. 2020, Alg. 1): each task gradient is projected onto the normal plane of
    every other task gradient it conflicts with (negative inner product), in random order; the
    projected gradients are summed.

    Hand-written (:func:`~taskgrouping.balancing.gramian_weightings.pcgrad_weights`) rather than
    TorchJD's ``PCGradWeighting``, whose loop of per-pair torch scalar operations alone costs more
    than the feature-level surrogate's time budget; it is the same algorithm with the same random
    draws, and tests pin it equal to TorchJD's."""

    name = "pcgrad"

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        return pcgrad_weights(gramian)


@register_balancer("gradvac")
class GradVac(_GramianBalancer):
    """Gradient Vaccine (Wang et al. 2021): like PCGrad but steers each pair towards an EMA target
    cosine instead of zero (``beta`` is the EMA decay). The EMA is the method's state and is saved
    by :meth:`state_dict`.

    Hand-written (:class:`~taskgrouping.balancing.gramian_weightings.GradVacWeights`) rather than
    TorchJD's ``GradVacWeighting``, whose ~180 torch scalar operations per step (8 tasks) cost
    ~8 ms, more than the feature-level surrogate's time budget; it is the same algorithm with the
    same random draws, and tests pin its trajectory equal to TorchJD's."""

    name = "gradvac"

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, **kw: Any) -> None:
        super().__init__(**kw)
        try:
            self._weighting = GradVacWeights(beta, eps)
        except ValueError as exc:
            raise ValueError(f"balancer 'gradvac': {exc}") from None

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        return self._weighting(gramian)

    def state_dict(self) -> dict[str, Any]:
        return self._weighting.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self._weighting.load_state(state)
        except ValueError as exc:
            raise ValueError(f"balancer 'gradvac': {exc}") from None


@register_balancer("mgda")
class MGDA(_GramianBalancer):
    """MGDA (Desideri 2012; Sener & Koltun 2018, Alg. 2): the min-norm point of the convex hull of
    the task gradients, by the Frank-Wolfe solver. Weights sum to one.

    Hand-written (:func:`~taskgrouping.balancing.gramian_weightings.mgda_weights`) rather than
    TorchJD's ``MGDAWeighting``, whose Frank-Wolfe loop of small torch operations costs about 1 ms
    per step on a CPU; same iterations, and tests pin it equal to TorchJD's."""

    name = "mgda"

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100, **kw: Any) -> None:
        super().__init__(**kw)
        if epsilon <= 0:
            raise ValueError(f"balancer {self.name!r}: epsilon must be > 0, got {epsilon}")
        if max_iters < 1:
            raise ValueError(f"balancer {self.name!r}: max_iters must be >= 1, got {max_iters}")
        self.epsilon, self.max_iters = float(epsilon), int(max_iters)

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        return mgda_weights(gramian, self.epsilon, self.max_iters)


@register_balancer("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun 2018, Sec. 3.3): MGDA on gradients w.r.t. the shared features,
    which bound the parameter-level problem; always ``feature_level=True``."""

    name = "mgda_ub"

    def __init__(self, **kw: Any) -> None:
        kw.pop("feature_level", None)
        super().__init__(feature_level=True, **kw)


@register_balancer("aligned_mtl")
class AlignedMTL(_TorchJDGramian):
    """Aligned-MTL (Senushkin et al. 2023, Alg. 1): align the principal components of the task
    Jacobian to a well-conditioned matrix scaled by its smallest (``scale_mode``) singular value;
    TorchJD's ``AlignedMTLWeighting`` with the uniform preference vector."""

    name = "aligned_mtl"
    torchjd_name = "aligned_mtl"

    def __init__(self, scale_mode: str = "min", **kw: Any) -> None:
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"balancer 'aligned_mtl': scale_mode must be 'min', 'median' or 'rmse', "
                             f"got {scale_mode!r}")
        super().__init__(torchjd_options={"scale_mode": scale_mode}, **kw)


@register_balancer("aligned_mtl_ub")
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB: Aligned-MTL on the shared features' gradients (``feature_level=True``)."""

    name = "aligned_mtl_ub"

    def __init__(self, **kw: Any) -> None:
        kw.pop("feature_level", None)
        super().__init__(feature_level=True, **kw)


@register_balancer("rgw")
class RandomGradientWeighting(_TorchJDGramian):
    """Random gradient weighting (Lin et al. 2022, Alg. 2): per step, weights
    ``softmax(N(0, I))`` (TorchJD's ``RandomWeighting``) times ``T``, so that they sum to ``T`` as
    RLW's do and the update keeps EW's scale."""

    name = "rgw"
    torchjd_name = "random"

    def weights(self, jacobian: Tensor) -> Tensor:
        return self._weighting(jacobian) * jacobian.shape[0]


@register_balancer("imtl")
class IMTL(_TorchJDGramian):
    """IMTL (Liu et al. 2021). IMTL-G: weights that give an update with equal projections onto
    every task's unit gradient (TorchJD's ``IMTLGWeighting``, which also handles dependent rows).
    With ``loss_scaling=True`` (default, the paper's hybrid IMTL) the aggregated losses are
    ``exp(s_t) L_t`` with learnable scales ``s`` trained on ``exp(s_t) L_t - s_t`` (IMTL-L); ``s``
    starts at 0, is trained by the main optimiser (:meth:`extra_parameters`) and so needs
    ``tasks`` (names or count) at construction."""

    name = "imtl"
    torchjd_name = "imtl_g"

    def __init__(self, loss_scaling: bool = True, tasks: TaskSpec = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.loss_scaling = bool(loss_scaling)
        self.log_scales = TaskVector(self.name, tasks, 0.0)

    def transform_losses(self, names: list[str], losses: list[Tensor]) -> list[Tensor]:
        if not self.loss_scaling:
            return losses
        s = self.log_scales.values(names, losses[0].device).detach()
        raw = torch.stack([loss.detach() for loss in losses])
        # d/ds_t [exp(s_t) L_t - s_t] = exp(s_t) L_t - 1 (IMTL-L); the model sees exp(s_t) L_t.
        param = self.log_scales.param
        grad = torch.zeros_like(param)
        grad[self.log_scales.order(names)] = torch.exp(s) * raw - 1.0
        param.grad = grad if param.grad is None else param.grad + grad
        return [loss * torch.exp(s_t) for loss, s_t in zip(losses, s)]

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_scales.parameter()] if self.loss_scaling else []

    def state_dict(self) -> dict[str, Any]:
        return {"log_scales": self.log_scales.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_scales.load(state.get("log_scales"), "log_scales")


@register_balancer("graddrop")
class GradDrop(GradientBalancer):
    """GradDrop (Chen et al. 2020, Alg. 1 lines 10-15): per coordinate, the sign purity
    ``P = (1 + sum_t g_t / sum_t |g_t|) / 2`` picks a sign (positive with probability ``P``,
    drawn once per coordinate) and every task's gradient is kept only where its sign agrees;
    the kept parts are summed. Equals TorchJD's ``GradDrop`` (no leak) for the same random draw.
    With ``feature_reduction="batch"`` the purity is computed from batch-summed feature gradients
    and the mask applied per sample, as in the paper. There are no task weights, so heads always
    get unweighted gradients."""

    name = "graddrop"

    def combine(self, stat: Tensor, apply: Tensor) -> tuple[Tensor, Tensor | None]:
        # Where sum |g_t| = 0 every g_t is 0, so the sum is 0 too and the purity is 1/2.
        purity = 0.5 * (1.0 + stat.sum(dim=0) / stat.abs().sum(dim=0).clamp_min(1e-30))
        u = torch.rand(purity.shape, dtype=stat.dtype, device=stat.device)
        # The kept sign is drawn once per coordinate, so the sum of the kept parts is the sum of
        # the positive (or negative) parts, taken where that sign was drawn.
        positive = torch.where(purity > u, apply.clamp_min(0.0).sum(dim=0), 0.0)
        negative = torch.where(purity < u, apply.clamp_max(0.0).sum(dim=0), 0.0)
        return positive + negative, None


@register_balancer("cagrad")
class CAGrad(_GramianBalancer):
    """CAGrad (Liu et al. 2021): the update within ``c * ||g0||`` of the mean gradient ``g0`` that
    maximises the worst task's improvement. Solved on the task Gramian by default
    (``solver="scipy"``: an exact active-set solve of the dual warm-started from the last step's
    solution, with SLSQP as the fallback, :func:`~taskgrouping.balancing.solvers.cagrad_dual`);
    ``solver="cvxpy"`` uses TorchJD's ``CAGradWeighting`` (needs ``pip install taskgrouping[solvers]``).
    ``rescale`` divides the update by ``1 + c**2`` (1, the authors' default), ``1 + c`` (2) or
    nothing (0, TorchJD's convention). The last dual solution is saved by :meth:`state_dict`."""

    name = "cagrad"

    def __init__(self, c: float = 0.4, rescale: int = 1, solver: Solver = "scipy", **kw: Any) -> None:
        super().__init__(**kw)
        if c < 0:
            raise ValueError(f"balancer 'cagrad': c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"balancer 'cagrad': rescale must be 0, 1 or 2, got {rescale}")
        if solver not in ("scipy", "cvxpy"):
            raise ValueError(f"balancer 'cagrad': solver must be 'scipy' or 'cvxpy', got {solver!r}")
        self.c, self.rescale, self.solver = float(c), rescale, solver
        self._torchjd = TorchJDWeights("cagrad", c=self.c) if solver == "cvxpy" else None
        self.dual: np.ndarray | None = None

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        if self.dual is not None and self.dual.shape[0] != gramian.shape[0]:
            raise ValueError(f"balancer 'cagrad' was set up for {self.dual.shape[0]} tasks but got {gramian.shape[0]}")
        self.dual = cagrad_dual(gramian, self.c, init=self.dual)
        return cagrad_weights(gramian, self.c, dual=self.dual)

    def weights(self, jacobian: Tensor) -> Tensor:
        w = self._torchjd(jacobian) if self._torchjd is not None else super().weights(jacobian)
        return w / {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]

    def state_dict(self) -> dict[str, Any]:
        return {"dual": None if self.dual is None else self.dual.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dual = state.get("dual")
        self.dual = None if dual is None else _tensor(dual, "dual", self.name).numpy()


@register_balancer("nash_mtl")
class NashMTL(GradientBalancer):
    """Nash-MTL (Navon et al. 2022): weights ``alpha`` solving ``G alpha = 1/alpha`` on the
    Frobenius-normalised Gramian (the Nash bargaining solution), then the update is clipped to
    norm ``max_norm`` (0 disables) as the authors clip the shared gradients. ``solver="scipy"``
    (default; exact Newton solve, deterministic) or ``"cvxpy"`` (TorchJD's sequential cvxpy solve;
    needs ``pip install taskgrouping[solvers]``). Weights are recomputed every
    ``update_weights_every`` steps; the last weights warm-start the next solve and are saved by
    :meth:`state_dict`."""

    name = "nash_mtl"

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, solver: Solver = "scipy",
                 **kw: Any) -> None:
        super().__init__(**kw)
        if max_norm < 0:
            raise ValueError(f"balancer 'nash_mtl': max_norm must be >= 0, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(f"balancer 'nash_mtl': update_weights_every must be >= 1, got {update_weights_every}")
        if solver not in ("scipy", "cvxpy"):
            raise ValueError(f"balancer 'nash_mtl': solver must be 'scipy' or 'cvxpy', got {solver!r}")
        if solver == "cvxpy" and not cvxpy_available():
            raise ImportError(f"balancer 'nash_mtl' with solver='cvxpy' needs cvxpy: `{SOLVERS_HINT}`")
        self.max_norm, self.update_every, self.solver = float(max_norm), int(update_weights_every), solver
        self.step = 0
        self.alpha: np.ndarray | None = None
        self._torchjd: TorchJDNashMTL | None = None

    def _solve(self, jacobian: Tensor) -> np.ndarray:
        if self.solver == "cvxpy":
            if self._torchjd is None:
                self._torchjd = TorchJDNashMTL(jacobian.shape[0])
            return self._torchjd(jacobian).double().cpu().numpy()
        return nash_mtl_weights(_gramian(jacobian), init=self.alpha)

    def weights(self, jacobian: Tensor) -> Tensor:
        t = jacobian.shape[0]
        if self.alpha is not None and self.alpha.shape[0] != t:
            raise ValueError(f"balancer 'nash_mtl' was set up for {self.alpha.shape[0]} tasks but got {t}")
        if self.alpha is None or self.step % self.update_every == 0:
            self.alpha = self._solve(jacobian)
        self.step += 1
        w = torch.as_tensor(self.alpha, dtype=jacobian.dtype, device=jacobian.device)
        if self.max_norm > 0:
            norm = torch.linalg.vector_norm(w @ jacobian)
            if norm > self.max_norm:
                w = w * (self.max_norm / norm)
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else _tensor(alpha, "alpha", self.name).numpy()


@register_balancer("cosreg")
class CosReg(Balancer):
    """Orthogonal-gradient regularisation (Suteu & Guo 2019): minimise
    ``sum_t L_t + lam * sum_{i<j} cos^2(g_i, g_j)``, where ``g_t`` is task ``t``'s gradient w.r.t.
    the shared parameters (or, with ``feature_level=True``, w.r.t. the shared features, flattened
    whole or summed over the batch per ``feature_reduction``). The penalty is differentiated
    through the gradients (double backward).

    Cost: ``dP/dg`` has a closed form (:meth:`penalty_and_row_grads`), so with ``v_t = lam dP/dg_t``
    the update is ``sum_t dL_t/dtheta + sum_t H_t v_t`` (``H_t = d g_t / d theta``): ONE backward
    seeded with ``v_t`` at each ``g_t`` gives the second-order part. At feature level the ``g_t``
    come from ONE pass through the heads when each task has its own
    (:func:`~taskgrouping.balancing.jacobian.task_feature_grads`) and the step costs about an EW
    step. At parameter level every ``g_t`` takes its own backward and the ``T`` Hessian-vector
    products cost about three more backward passes each, so the exact step costs about 17 x EW
    (``hvp_tasks=1``: about 7.8 x EW; benchmarks/results/balancers.md). The first-order part is
    seeded in the same backward as the second-order one, whose traversal of the network it shares
    (as fast, measured, as summing the per-task gradients instead).

    ``hvp_tasks=m`` (parameter level only) takes the Hessian-vector products of ``m`` tasks per
    step, drawn uniformly without replacement, scaled by ``T / m``; the other tasks' gradients
    are plain backward passes (no ``create_graph``). All rows, hence the penalty and every
    ``v_t``, stay exact; only which ``H_t v_t`` enter is random, and each task is drawn with
    probability ``m / T``, so ``E[(T/m) sum_{t in S} H_t v_t] = sum_t H_t v_t``: the update is an
    unbiased estimate of the exact one (``m = T`` is the exact update). The draw of step ``k`` comes
    from ``numpy.random.default_rng([seed, k])``; ``k`` is the balancer's state
    (:meth:`state_dict`), so a resumed run draws what the uninterrupted one would have.
    """

    name = "cosreg"
    needs_grads = True

    def __init__(self, lam: float = 0.1, feature_level: bool = False, feature_reduction: str = "sample",
                 eps: float = 1e-12, hvp_tasks: int | None = None, seed: int = 0) -> None:
        if lam < 0:
            raise ValueError(f"balancer 'cosreg': lam must be >= 0, got {lam}")
        if feature_reduction not in ("sample", "batch"):
            raise ValueError(f"balancer 'cosreg': feature_reduction must be 'sample' or 'batch', "
                             f"got {feature_reduction!r}")
        if hvp_tasks is not None:
            if isinstance(hvp_tasks, bool) or not isinstance(hvp_tasks, (int, np.integer)) or hvp_tasks < 1:
                raise ValueError(f"balancer 'cosreg': hvp_tasks must be an int >= 1 (tasks whose Hessian-vector "
                                 f"product is taken per step) or None (all: the exact update), got {hvp_tasks!r}")
            if feature_level:
                raise ValueError(f"balancer 'cosreg': hvp_tasks={hvp_tasks!r} applies at parameter level only (the "
                                 "feature-level update is already about one EW step); drop it or use "
                                 "feature_level=False")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"balancer 'cosreg': seed must be an int >= 0, got {seed!r}")
        self.lam, self.eps = float(lam), float(eps)
        self.feature_level = bool(feature_level)
        self.uses_features = self.feature_level
        self.feature_reduction = feature_reduction
        self.hvp_tasks = None if hvp_tasks is None else int(hvp_tasks)
        self.seed = int(seed)
        self._draws = 0
        self._last_penalty = 0.0

    def _row(self, inputs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
        parts = []
        for x, g in zip(inputs, grads):
            g = torch.zeros_like(x) if g is None else g
            if self.feature_level and self.feature_reduction == "batch" and g.ndim > 0:
                g = g.sum(dim=0)
            parts.append(g.reshape(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def penalty_and_row_grads(self, rows: Sequence[Tensor], scale: float = 1.0) -> tuple[float, Tensor]:
        """The penalty ``P = sum_{i<j} cos^2(r_i, r_j)`` and ``scale * dP/dR`` for the stacked task
        gradients ``R`` (T x D), in closed form.

        With ``n_i = max(|r_i|, eps)``, ``C = R R^T / n n^T``, ``A_ij = C_ij / (n_i n_j)`` off the
        diagonal (0 on it) and ``s_i = sum_{j != i} C_ij^2``: ``dP/dR = 2 (A - diag(s / n^2)) R``
        (the ``diag`` term only where ``|r_i| > eps``, as the clamped norm is constant below).
        Written out because autograd would record and replay a handful of ``T x D`` operations
        for it on every step.
        """
        with torch.no_grad():
            jac = torch.stack([r.detach() for r in rows])
            gram = (jac @ jac.T).double().cpu().numpy()  # the T x T part in float64 NumPy
        raw = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        norms = np.maximum(raw, self.eps)
        outer = np.outer(norms, norms)
        cos = gram / outer
        np.fill_diagonal(cos, 0.0)
        sq = cos * cos
        shrink = np.where(raw > self.eps, sq.sum(axis=1) / norms ** 2, 0.0)
        mix = (2.0 * scale) * (cos / outer - np.diag(shrink))
        return 0.5 * float(sq.sum()), torch.as_tensor(mix, dtype=jac.dtype, device=jac.device) @ jac

    def _draw(self, n_tasks: int) -> list[int] | None:
        """This step's tasks for the Hessian-vector products (``None``: all of them, exactly)."""
        if self.hvp_tasks is None:
            return None
        if self.hvp_tasks > n_tasks:
            raise ValueError(f"balancer 'cosreg': hvp_tasks={self.hvp_tasks} exceeds the {n_tasks} tasks given; "
                             f"expected 1 <= hvp_tasks <= {n_tasks}")
        rng = np.random.default_rng([self.seed, self._draws])
        self._draws += 1
        return sorted(rng.choice(n_tasks, size=self.hvp_tasks, replace=False).tolist())

    def backward(self, losses, shared_params, features=None):
        return self._backward(losses, shared_params, features, self._draw(len(losses)) if losses else None)

    def _backward(self, losses: dict[str, Tensor], shared_params: Sequence[Tensor],
                  features: Sequence[Tensor] | None, hvp: Sequence[int] | None) -> dict[str, float]:
        """The update with the second-order term taken for the tasks (positions in ``losses``) in
        ``hvp`` only, scaled by ``T / len(hvp)``; ``None`` takes it for all (the exact update)."""
        names, loss_list = check_losses(losses, self.name)
        if self.feature_level:
            inputs = list(features or [])
            if not inputs or not all(isinstance(f, Tensor) and f.requires_grad for f in inputs):
                raise ValueError("balancer 'cosreg' with feature_level=True needs the shared features (in the autograd "
                                 "graph) the heads read; pass them or use feature_level=False")
        else:
            inputs = [p for p in (shared_params or []) if p.requires_grad]
            if not inputs:
                raise ValueError("balancer 'cosreg' needs per-task gradients w.r.t. the shared parameters, but "
                                 "shared_params is empty; pass the trunk's parameters or use feature_level=True")
        if len(loss_list) < 2:
            self._last_penalty = 0.0
            loss_list[0].backward()
            return {"cosreg/penalty": 0.0}
        n = len(loss_list)
        hvp = list(range(n)) if hvp is None else sorted(set(hvp))
        if not hvp or not all(0 <= t < n for t in hvp):
            raise ValueError(f"balancer 'cosreg': hvp tasks must be a non-empty subset of 0..{n - 1}, got {hvp}")
        if self.feature_level:  # one backward through the heads when each task has its own head
            in_grads = task_feature_grads(loss_list, inputs, create_graph=True, with_heads=False)[0]
        else:  # the graph of g_t only where its Hessian-vector product is taken
            second = set(hvp) if self.lam > 0 else set()
            in_grads = [torch.autograd.grad(loss, inputs, retain_graph=True, create_graph=t in second,
                                            allow_unused=True) if loss.requires_grad else [None] * len(inputs)
                        for t, loss in enumerate(loss_list)]
        rows = [self._row(inputs, grads) for grads in in_grads]
        self._last_penalty, row_grads = self.penalty_and_row_grads(rows, scale=self.lam * n / len(hvp))
        # One backward: sum_t L_t (first order) and, through the graphs that made the sampled rows,
        # (T/m) lam dP/dg_t; both share the network's backward nodes.
        live = [loss for loss in loss_list if loss.requires_grad]
        roots = [torch.stack(live).sum()] if live else []
        seeds = [torch.ones_like(roots[0])] if live else []
        for t in hvp:
            if rows[t].requires_grad and self.lam > 0:
                roots.append(rows[t])
                seeds.append(row_grads[t])
        if roots:
            torch.autograd.backward(roots, grad_tensors=seeds)
        return {"cosreg/penalty": self._last_penalty}

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self._draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        draws = state.get("draws", 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"balancer 'cosreg': state entry 'draws' must be an int >= 0, got {draws!r}")
        self._draws = draws


__all__ = ["EqualWeighting", "PCGrad", "GradVac", "MGDA", "MGDAUB", "AlignedMTL", "AlignedMTLUB",
           "RandomGradientWeighting", "IMTL", "GradDrop", "CAGrad", "NashMTL", "CosReg"]
