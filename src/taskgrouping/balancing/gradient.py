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

import itertools
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.balancing.base import Balancer, register_balancer
from taskgrouping.balancing.jacobian import GradientBalancer, check_losses
from taskgrouping.balancing.solvers import cagrad_weights, nash_mtl_weights
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


@register_balancer("pcgrad")
class PCGrad(_TorchJDGramian):
    """PCGrad (Yu et al. 2020, Alg. 1): each task gradient is projected onto the normal plane of
    every other task gradient it conflicts with (negative inner product), in random order; the
    projected gradients are summed. Weights from TorchJD's ``PCGradWeighting``."""

    name = "pcgrad"
    torchjd_name = "pcgrad"


@register_balancer("gradvac")
class GradVac(_TorchJDGramian):
    """Gradient Vaccine (Wang et al. 2021): like PCGrad but steers each pair towards an EMA target
    cosine instead of zero (TorchJD's ``GradVacWeighting``; ``beta`` is the EMA decay). The EMA
    is the method's state and is saved by :meth:`state_dict`."""

    name = "gradvac"
    torchjd_name = "gradvac"

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, **kw: Any) -> None:
        super().__init__(torchjd_options={"beta": beta, "eps": eps}, **kw)

    def state_dict(self) -> dict[str, Any]:
        return self._weighting.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._weighting.load_state(state)


@register_balancer("mgda")
class MGDA(_TorchJDGramian):
    """MGDA (Desideri 2012; Sener & Koltun 2018, Alg. 2): the min-norm point of the convex hull of
    the task gradients, by TorchJD's Frank-Wolfe solver. Weights sum to one."""

    name = "mgda"
    torchjd_name = "mgda"

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100, **kw: Any) -> None:
        super().__init__(torchjd_options={"epsilon": epsilon, "max_iters": max_iters}, **kw)


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
        total_abs = stat.abs().sum(dim=0)
        purity = 0.5 * (1.0 + torch.where(total_abs > 0, stat.sum(dim=0) / total_abs.clamp_min(1e-30),
                                          torch.zeros_like(total_abs)))
        u = torch.rand(purity.shape, dtype=stat.dtype, device=stat.device)
        keep_pos = (purity > u).unsqueeze(0).unsqueeze(0)
        keep_neg = (purity < u).unsqueeze(0).unsqueeze(0)
        mask = (keep_pos & (apply > 0)) | (keep_neg & (apply < 0))
        return (apply * mask).sum(dim=0), None


@register_balancer("cagrad")
class CAGrad(GradientBalancer):
    """CAGrad (Liu et al. 2021): the update within ``c * ||g0||`` of the mean gradient ``g0`` that
    maximises the worst task's improvement. Solved on the task Gramian with SciPy by default
    (``solver="scipy"``, :func:`~taskgrouping.balancing.solvers.cagrad_weights`); ``solver="cvxpy"``
    uses TorchJD's ``CAGradWeighting`` (needs ``pip install taskgrouping[solvers]``).
    ``rescale`` divides the update by ``1 + c**2`` (1, the authors' default), ``1 + c`` (2) or
    nothing (0, TorchJD's convention)."""

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

    def weights(self, jacobian: Tensor) -> Tensor:
        if self._torchjd is not None:
            w = self._torchjd(jacobian)
        else:
            gram = (jacobian.double() @ jacobian.double().T).cpu().numpy()
            w = torch.as_tensor(cagrad_weights(gram, self.c), dtype=jacobian.dtype, device=jacobian.device)
        return w / {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]


@register_balancer("nash_mtl")
class NashMTL(GradientBalancer):
    """Nash-MTL (Navon et al. 2022): weights ``alpha`` solving ``G alpha = 1/alpha`` on the
    Frobenius-normalised Gramian (the Nash bargaining solution), then the update is clipped to
    norm ``max_norm`` (0 disables) as the authors clip the shared gradients. ``solver="scipy"``
    (default; exact, deterministic) or ``"cvxpy"`` (TorchJD's sequential cvxpy solve; needs
    ``pip install taskgrouping[solvers]``). Weights are recomputed every ``update_weights_every``
    steps; the last weights warm-start the next solve and are saved by :meth:`state_dict`."""

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
        gram = (jacobian.double() @ jacobian.double().T).cpu().numpy()
        return nash_mtl_weights(gram, init=self.alpha)

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
    through the gradients (double backward), which at parameter level costs about two extra
    backward passes per task; the feature-level variant only differentiates through the heads and
    then makes one backward through the trunk."""

    name = "cosreg"
    needs_grads = True

    def __init__(self, lam: float = 0.1, feature_level: bool = False, feature_reduction: str = "sample",
                 eps: float = 1e-12) -> None:
        if lam < 0:
            raise ValueError(f"balancer 'cosreg': lam must be >= 0, got {lam}")
        if feature_reduction not in ("sample", "batch"):
            raise ValueError(f"balancer 'cosreg': feature_reduction must be 'sample' or 'batch', "
                             f"got {feature_reduction!r}")
        self.lam, self.eps = float(lam), float(eps)
        self.feature_level = bool(feature_level)
        self.uses_features = self.feature_level
        self.feature_reduction = feature_reduction
        self._last_penalty = 0.0

    def penalty(self, losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
        """``sum_{i<j} cos^2(g_i, g_j)`` with the gradients w.r.t. ``inputs`` (graph kept)."""
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, create_graph=True, allow_unused=True) \
                if loss.requires_grad else [None] * len(inputs)
            parts = []
            for x, g in zip(inputs, grads):
                g = torch.zeros_like(x) if g is None else g
                if self.feature_level and self.feature_reduction == "batch" and g.ndim > 0:
                    g = g.sum(dim=0)
                parts.append(g.reshape(-1))
            rows.append(torch.cat(parts))
        unit = F.normalize(torch.stack(rows), dim=1, eps=self.eps)
        cos = unit @ unit.T
        return sum((cos[i, j] ** 2 for i, j in itertools.combinations(range(len(rows)), 2)),
                   torch.zeros((), device=cos.device))

    def backward(self, losses, shared_params, features=None):
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
        pen = self.penalty(loss_list, inputs) if len(loss_list) > 1 else torch.zeros((), device=loss_list[0].device)
        self._last_penalty = float(pen.detach())
        (torch.stack(loss_list).sum() + self.lam * pen).backward()
        return {"cosreg/penalty": self._last_penalty}


__all__ = ["EqualWeighting", "PCGrad", "GradVac", "MGDA", "MGDAUB", "AlignedMTL", "AlignedMTLUB",
           "RandomGradientWeighting", "IMTL", "GradDrop", "CAGrad", "NashMTL", "CosReg"]
