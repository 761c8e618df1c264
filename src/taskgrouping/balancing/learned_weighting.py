"""Task weights learned from the task gradients: GradNorm and Auto-Lambda.

Both are gradient balancers (:mod:`taskgrouping.balancing.gradient_balancer`) with both levels:
GradNorm (Chen et al. 2018) learns weights that equalise the weighted gradient norms at the last
shared layer (or the shared features); Auto-Lambda (Liu et al. 2022) meta-learns weights from the
task Gramian. The update is the weighted sum of the task gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.balancing.base import register_balancer
from taskgrouping.balancing.gradient_balancer import GradientBalancer, check_losses
from taskgrouping.balancing.task_gradients import iter_task_grads
from taskgrouping.balancing.task_weights import TaskSpec, TaskVector, VectorAdam, floats


@register_balancer("gradnorm")
class GradNorm(GradientBalancer):
    """GradNorm (Chen et al. 2018, Eq. 1-2 and Alg. 1). Learnable weights ``w`` (start at 1, trained
    by the main optimiser, renormalised to sum to ``T`` before each use) are pushed so that each
    weighted gradient norm ``G_t = w_t ||dL_t/dW||`` approaches ``mean(G) * r_t**alpha``, where
    ``r_t`` is the task's loss ratio ``L_t / L_t(0)`` relative to the mean ratio. ``W`` is the last
    shared layer: the last tensor with >= 2 dimensions in ``shared_params`` (parameters listed in
    module order), or, with ``feature_level=True``, the shared features (for several branches, all
    of them). Since ``G_t`` is linear in ``w_t``, ``d|G_t - target_t| / dw_t =
    sign(G_t - target_t) ||dL_t/dW||`` with the target held constant, as in the paper; the model
    gets the gradient of ``sum_t w_t L_t``.

    At feature level the per-task feature gradients needed for the norms are the rows of the
    feature Jacobian, so the update is assembled by the fast-surrogate machinery of
    :class:`~taskgrouping.balancing.gradient_balancer.GradientBalancer` (trunk: one backward of
    ``sum_t w_t dL_t/dZ``; heads: ``w_t dL_t/dphi``), which equals the gradient of
    ``sum_t w_t L_t`` without a second backward through the heads."""

    name = "gradnorm"

    def __init__(self, tasks: TaskSpec = None, alpha: float = 1.5, feature_level: bool = False) -> None:
        super().__init__(feature_level=feature_level, feature_reduction="sample", head_grads="weighted")
        self.alpha = float(alpha)
        self.task_weights = TaskVector(self.name, tasks, 1.0)
        self.initial_losses: dict[str, float] = {}
        self.last_norms = torch.zeros(0)
        self._current: Tensor | None = None
        self._norms: Tensor | None = None

    def _last_layer(self, shared_params: Sequence[Tensor]) -> list[Tensor]:
        mats = [p for p in (shared_params or []) if p.requires_grad and p.ndim >= 2]
        if not mats:
            raise ValueError("balancer 'gradnorm' needs the shared parameters (to take gradient norms at the last "
                             "shared layer), but shared_params has no weight matrix; pass them or use "
                             "feature_level=True")
        return [mats[-1]]

    def weights(self, jacobian: Tensor) -> Tensor:
        """Feature level: ``jacobian``'s rows are the per-task feature gradients; keeps their norms."""
        if self._current is None:
            raise TypeError("balancer 'gradnorm' sets its weights in backward(); it has no weights of a bare Jacobian")
        self._norms = torch.linalg.vector_norm(jacobian.detach().float(), dim=1)
        return self._current.to(device=jacobian.device, dtype=jacobian.dtype)

    def backward(self, losses, shared_params, features=None):
        names, loss_list = check_losses(losses, self.name)
        device = loss_list[0].device
        self.task_weights.values(names, device)  # creates / places the weights
        param = self.task_weights.param
        with torch.no_grad():  # renormalise after the optimiser's last step (paper: sum_t w_t = T)
            param.clamp_(min=1e-6)
            param.mul_(param.numel() / param.sum())
        w_now = self.task_weights.values(names, device).detach()
        if self.feature_level:
            self._current = w_now
            self._backward_features(loss_list, features)
            norms_t = self._norms.to(device)
        else:
            layer = self._last_layer(shared_params)
            norms = []
            per_task = list(iter_task_grads(loss_list, layer))
            if self.ranks.active:  # the norms of the global batch's gradients: the ranks' shares add up
                per_task = _summed(self.ranks, layer, per_task)
            for grads in per_task:
                sq = sum((g.float().pow(2).sum() for g in grads if g is not None), torch.zeros((), device=device))
                norms.append(sq.sqrt())
            norms_t = torch.stack(norms)
            (w_now * torch.stack(loss_list)).sum().backward()
        stacked = torch.stack([loss.detach() for loss in loss_list])
        for n, v in zip(names, stacked.tolist()):
            self.initial_losses.setdefault(n, v)
        ratio = stacked / torch.tensor([self.initial_losses[n] if self.initial_losses[n] != 0 else 1.0 for n in names],
                                       device=stacked.device)
        rel = ratio / ratio.mean().clamp_min(1e-12)
        g = w_now * norms_t
        target = g.mean() * rel.pow(self.alpha)
        grad_w = torch.sign(g - target) * norms_t
        full = torch.zeros_like(param)
        full[self.task_weights.order(names)] = grad_w.to(full)
        param.grad = full if param.grad is None else param.grad + full
        self.last_norms = g
        logs = {f"weight/{n}": float(v) for n, v in zip(names, w_now.tolist())}
        logs.update({f"gradnorm/{n}": float(v) for n, v in zip(names, g.tolist())})
        return logs

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.task_weights.parameter()]

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.task_weights.state(), "initial_losses": dict(self.initial_losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_weights.load(state.get("weights"), "weights")
        self.initial_losses = {str(k): float(v) for k, v in state.get("initial_losses", {}).items()}


def _summed(ranks: Any, params: Sequence[Tensor], per_task: list[Sequence[Tensor | None]]) -> list[list[Tensor]]:
    """Per-task gradients w.r.t. ``params`` summed over the ranks (one all-reduce; missing ones are zeros)."""
    flat = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                                   for p, g in zip(params, grads)]) for grads in per_task])
    ranks.all_sum(flat)
    out = []
    for row in flat:
        parts, offset = [], 0
        for p in params:
            parts.append(row[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        out.append(parts)
    return out


@register_balancer("auto_lambda")
class AutoLambda(GradientBalancer):
    """Auto-Lambda (Liu et al. 2022), first-order form. Task weights ``lambda`` (start at
    ``init``, the authors' 0.1) are the update's weights, ``d = sum_t lambda_t g_t``, and are
    meta-learned to lower the loss of the ``primary`` tasks (default: all) after a step:
    ``d L_pri(theta - a d) / d lambda_t = -a g_pri . g_t``, a column sum of the task Gramian,
    stepped by Adam (``lr``, the authors' 1e-4; Adam makes the unknown model step ``a``
    irrelevant), then clipped at 0.

    Deviation: the paper evaluates ``g_pri`` after a virtual step on a held-out batch
    (finite-difference second order); the balancer contract passes neither the model nor another
    batch, so ``g_pri`` is taken at the current parameters on the training batch."""

    name = "auto_lambda"

    def __init__(self, primary: Sequence[str] | None = None, init: float = 0.1, lr: float = 1e-4, **kw: Any) -> None:
        super().__init__(**kw)
        self.primary = None if primary is None else [str(p) for p in primary]
        self.init = float(init)
        self.adam = VectorAdam(lr)
        self.lambdas: Tensor | None = None
        self._names: list[str] | None = None

    def backward(self, losses, shared_params, features=None):
        self._names = list(losses)
        if self.primary is not None:
            unknown = [p for p in self.primary if p not in losses]
            if unknown:
                raise ValueError(f"balancer 'auto_lambda': primary tasks {unknown} are not among the losses "
                                 f"{list(losses)}")
        return super().backward(losses, shared_params, features)

    def weights(self, jacobian: Tensor) -> Tensor:
        t = jacobian.shape[0]
        if self.lambdas is None:
            self.lambdas = torch.full((t,), self.init)
        if self.lambdas.numel() != t:
            raise ValueError(f"balancer 'auto_lambda' was set up for {self.lambdas.numel()} tasks but got {t}")
        current = self.lambdas.clone()
        names = self._names if self._names is not None and len(self._names) == t else None
        pri = torch.ones(t) if self.primary is None or names is None else \
            torch.tensor([1.0 if n in self.primary else 0.0 for n in names])
        gram = (jacobian @ jacobian.T).detach().float().cpu()
        meta_grad = -(pri @ gram)
        self.lambdas = self.adam.step(self.lambdas, meta_grad).clamp_min(0.0)
        return current.to(device=jacobian.device, dtype=jacobian.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": None if self.lambdas is None else self.lambdas.tolist(), "adam": self.adam.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lam = state.get("lambdas")
        self.lambdas = None if lam is None else floats(lam, "lambdas", self.name)
        self.adam.load(state.get("adam", {}), self.name)



__all__ = ["GradNorm", "AutoLambda"]
