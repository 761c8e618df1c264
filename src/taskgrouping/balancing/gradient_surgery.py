"""Gradient surgery: each task gradient loses the parts that conflict with the others.

Registered names: ``pcgrad`` (projection onto the normal plane of conflicting gradients, Yu et
al. 2020), ``gradvac`` (steering each pair towards a target cosine, Wang et al. 2021) and
``graddrop`` (dropping the gradient parts whose sign disagrees with a drawn one, Chen et al.
2020). Corrected gradients are added at full scale, like EW.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskgrouping.balancing.base import register_balancer
from taskgrouping.balancing.gradient_balancer import GradientBalancer, GramianBalancer
from taskgrouping.balancing.gramian_weightings import GradVacWeights, pcgrad_weights


@register_balancer("pcgrad")
class PCGrad(GramianBalancer):
    """PCGrad (Yu et al. 2020, Alg. 1): each task gradient is projected onto the normal plane of
    every other task gradient it conflicts with (negative inner product), in random order; the
    projected gradients are summed.

    Computed by :func:`~taskgrouping.balancing.gramian_weightings.pcgrad_weights` as TorchJD's
    ``PCGradWeighting`` but faster; tests pin them equal."""

    name = "pcgrad"

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        return pcgrad_weights(gramian)


@register_balancer("gradvac")
class GradVac(GramianBalancer):
    """Gradient Vaccine (Wang et al. 2021): like PCGrad but steers each pair towards an EMA target
    cosine instead of zero (``beta`` is the EMA decay). The EMA is the method's state and is saved
    by :meth:`state_dict`.

    Computed by :class:`~taskgrouping.balancing.gramian_weightings.GradVacWeights` as TorchJD's
    ``GradVacWeighting`` but faster; tests pin the trajectories equal."""

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




__all__ = ["PCGrad", "GradVac", "GradDrop"]
