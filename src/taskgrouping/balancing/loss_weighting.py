"""Loss weighting: the update is the gradient of ``sum_t w_t L_t``, one backward like EW, for task
weights ``w`` chosen by the method (Mao et al. 2024's and InterroGate's weighting baselines).

Registered names: ``uw`` (uncertainty, Kendall et al. 2018), ``rlw`` (random, Lin et al. 2022),
``dwa`` (dynamic weight average, Liu et al. 2019) and ``famo`` (Liu et al. 2023). None of them has
a feature level: they never look at per-task gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.balancing.base import Balancer, register_balancer
from taskgrouping.balancing.gradient_balancer import check_losses
from taskgrouping.balancing.task_weights import TaskSpec, TaskVector, VectorAdam, floats


class LossWeighting(Balancer):
    """Base: ``backward`` is one backward of :meth:`combined_loss`."""

    def combined_loss(self, losses: dict[str, Tensor]) -> Tensor:
        raise TypeError(f"balancer {self.name!r} does not define combined_loss()")

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[Tensor],
                 features: Sequence[Tensor] | None = None) -> dict[str, float]:
        check_losses(losses, self.name)
        self.combined_loss(losses).backward()
        return {f"weight/{n}": float(v) for n, v in zip(losses, self.last_weights.tolist())}

    last_weights: Tensor = torch.zeros(0)


@register_balancer("uw")
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (Kendall et al. 2018, Eq. 5 / 7): with ``s_t = log sigma_t^2``,
    minimise ``sum_t L_t / (2 sigma_t^2) + log sigma_t = sum_t (exp(-s_t) L_t + s_t) / 2``.
    The same ``1/(2 sigma^2)`` form is used for every task kind (the paper's classification
    variant drops the 1/2). ``s`` starts at 0 and is trained by the main optimiser."""

    name = "uw"

    def __init__(self, tasks: TaskSpec = None) -> None:
        self.log_vars = TaskVector(self.name, tasks, 0.0)

    def combined_loss(self, losses: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack([v.reshape(()) for v in losses.values()])
        s = self.log_vars.values(list(losses), stacked.device)
        self.last_weights = 0.5 * torch.exp(-s.detach())
        return (0.5 * torch.exp(-s) * stacked + 0.5 * s).sum()

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_vars.parameter()]

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": self.log_vars.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_vars.load(state.get("log_vars"), "log_vars")


@register_balancer("rlw")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting (Lin et al. 2022, Alg. 1): each step, ``w = T * softmax(N(0, I))`` -
    positive, summing to ``T`` so the scale matches EW (the paper's weights sum to one)."""

    name = "rlw"

    def combined_loss(self, losses: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack([v.reshape(()) for v in losses.values()])
        t = stacked.numel()
        self.last_weights = t * F.softmax(torch.randn(t, device=stacked.device), dim=0)
        return (self.last_weights * stacked).sum()


@register_balancer("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic weight average (Liu et al. 2019, MTAN, Eq. 7):
    ``w_t = T exp(r_t / tau) / sum_i exp(r_i / tau)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the ratio
    of the task's average training loss over the last two epochs; ``w = 1`` for the first two
    epochs. Epoch losses come from :meth:`on_epoch_end` (the trainer's averages), or, if it passes
    none, from the losses this balancer saw during the epoch."""

    name = "dwa"

    def __init__(self, temperature: float = 2.0) -> None:
        if temperature <= 0:
            raise ValueError(f"balancer 'dwa': temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._count = 0

    def task_weights(self, names: list[str]) -> Tensor:
        """The weights for the current epoch (ones until two epochs of history exist)."""
        if len(self.history) < 2:
            return torch.ones(len(names))
        prev, prev2 = self.history[-1], self.history[-2]
        missing = [n for n in names if n not in prev or n not in prev2]
        if missing:
            raise ValueError(f"balancer 'dwa': no loss history for tasks {missing}; the history has {sorted(prev)}")
        ratios = torch.tensor([prev[n] / prev2[n] if prev2[n] != 0 else 1.0 for n in names])
        return len(names) * F.softmax(ratios / self.temperature, dim=0)

    def combined_loss(self, losses: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack([v.reshape(()) for v in losses.values()])
        for n, v in zip(losses, stacked.detach().tolist()):
            self._sums[n] = self._sums.get(n, 0.0) + v
        self._count += 1
        self.last_weights = self.task_weights(list(losses)).to(stacked.device)
        return (self.last_weights * stacked).sum()

    def on_epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        if train_losses:
            record = {k: float(v) for k, v in train_losses.items()}
        elif self._count:
            record = {k: v / self._count for k, v in self._sums.items()}
        else:
            return
        self.history = (self.history + [record])[-2:]
        self._sums, self._count = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "sums": dict(self._sums), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("balancer 'dwa': state entry 'history' must be a list of {task: loss} dicts")
        self.history = [{str(k): float(v) for k, v in h.items()} for h in history][-2:]
        self._sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        self._count = int(state.get("count", 0))


@register_balancer("famo")
class FAMO(LossWeighting):
    """FAMO (Liu et al. 2023, Alg. 1): logits ``xi`` with ``z = softmax(xi)``; the update is the
    gradient of ``sum_t z_t log(L_t - min_t + eps) / c``, ``c = sum_t z_t / (L_t - min_t + eps)``,
    i.e. task weights ``z_t / (c (L_t - min_t + eps))`` summing to one. ``xi`` follows the decrease of
    the log-losses: ``grad = J_softmax(xi)^T delta``, ``delta_t = log L_t(before) - log L_t(after)``,
    stepped by Adam (``lr``, weight decay ``gamma``).

    The balancer contract has no hook after the optimiser step, so "after" is the next call's
    losses (the next batch) rather than a second forward pass on the same batch; the update of
    ``xi`` therefore happens at the start of each backward, from the previous step's losses.
    """

    name = "famo"

    def __init__(self, lr: float = 0.025, gamma: float = 1e-3, min_losses: Sequence[float] | None = None,
                 eps: float = 1e-8) -> None:
        self.adam = VectorAdam(lr, weight_decay=gamma)
        self.eps = float(eps)
        self.min_losses = None if min_losses is None else floats(list(min_losses), "min_losses", self.name)
        self.logits: Tensor | None = None
        self.prev_losses: Tensor | None = None

    def _shifted(self, stacked: Tensor) -> Tensor:
        floor = torch.zeros_like(stacked) if self.min_losses is None else self.min_losses.to(stacked)
        return (stacked - floor).clamp_min(0.0) + self.eps

    def combined_loss(self, losses: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack([v.reshape(()) for v in losses.values()])
        t = stacked.numel()
        if self.logits is None:
            self.logits = torch.zeros(t)
        if self.logits.numel() != t:
            raise ValueError(f"balancer 'famo' was set up for {self.logits.numel()} tasks but got {t} losses")
        d = self._shifted(stacked.detach()).cpu()
        if self.prev_losses is not None:
            delta = torch.log(self.prev_losses) - torch.log(d)
            z = F.softmax(self.logits, dim=0)
            # Vector-Jacobian product of softmax: diag(z) - z z^T applied to delta.
            self.logits = self.adam.step(self.logits, z * (delta - (z * delta).sum()))
        self.prev_losses = d
        z = F.softmax(self.logits, dim=0)
        c = (z / d).sum()
        self.last_weights = (z / (c * d)).to(stacked.device)
        return (self.last_weights * stacked).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"logits": None if self.logits is None else self.logits.tolist(),
                "prev_losses": None if self.prev_losses is None else self.prev_losses.tolist(),
                "adam": self.adam.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logits = None if state.get("logits") is None else floats(state["logits"], "logits", self.name)
        prev = state.get("prev_losses")
        self.prev_losses = None if prev is None else floats(prev, "prev_losses", self.name)
        self.adam.load(state.get("adam", {}), self.name)



__all__ = ["LossWeighting", "UncertaintyWeighting", "RandomLossWeighting", "DynamicWeightAverage", "FAMO"]
