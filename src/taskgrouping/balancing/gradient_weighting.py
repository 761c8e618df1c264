"""Weightings of the task Jacobian in closed form or at random: the update is ``w @ J``.

Registered names: ``ew`` (equal weighting; at feature level a check of the surrogate machinery),
``rgw`` (random gradient weighting, Lin et al. 2022), ``imtl`` (IMTL, Liu et al. 2021),
``aligned_mtl`` and ``aligned_mtl_ub`` (Senushkin et al. 2023). IMTL-G, Aligned-MTL and the random
weights come from TorchJD (:mod:`taskgrouping.balancing.torchjd_adapter`). RGW's random weights
are scaled to sum to ``T`` like RLW's; Aligned-MTL's sum to one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from taskgrouping.balancing.base import Balancer, register_balancer
from taskgrouping.balancing.gradient_balancer import FeatureLevelOnly, GradientBalancer, check_losses
from taskgrouping.balancing.task_weights import TaskSpec, TaskVector
from taskgrouping.balancing.torchjd_adapter import TorchJDWeights


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


class TorchJDBalancer(GradientBalancer):
    """A method whose task weights come from a TorchJD weighting (see ``torchjd_adapter``)."""

    torchjd_name = ""

    def __init__(self, feature_level: bool = False, feature_reduction: str = "sample",
                 head_grads: str = "unweighted", torchjd_options: dict[str, Any] | None = None) -> None:
        super().__init__(feature_level, feature_reduction, head_grads)
        self._weighting = TorchJDWeights(self.torchjd_name, **(torchjd_options or {}))

    def weights(self, jacobian: Tensor) -> Tensor:
        return self._weighting(jacobian)


@register_balancer("aligned_mtl")
class AlignedMTL(TorchJDBalancer):
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
class AlignedMTLUB(FeatureLevelOnly, AlignedMTL):
    """Aligned-MTL-UB: Aligned-MTL on the shared features' gradients (``feature_level=True``)."""

    name = "aligned_mtl_ub"


@register_balancer("rgw")
class RandomGradientWeighting(TorchJDBalancer):
    """Random gradient weighting (Lin et al. 2022, Alg. 2): per step, weights
    ``softmax(N(0, I))`` (TorchJD's ``RandomWeighting``) times ``T``, so that they sum to ``T`` as
    RLW's do and the update keeps EW's scale."""

    name = "rgw"
    torchjd_name = "random"

    def weights(self, jacobian: Tensor) -> Tensor:
        return self._weighting(jacobian) * jacobian.shape[0]


@register_balancer("imtl")
class IMTL(TorchJDBalancer):
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




__all__ = ["EqualWeighting", "TorchJDBalancer", "RandomGradientWeighting", "IMTL", "AlignedMTL", "AlignedMTLUB"]
