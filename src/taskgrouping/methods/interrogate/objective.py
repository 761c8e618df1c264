"""InterroGate's training objective (Bejnordi et al., ICML 2024, Sec. 3)::

    Σ_t ω_t L_t  +  λ_s · mean_t max(0, mean_ℓ mean_c σ(α_t^ℓ) − τ_t)          (hinge, Eq. 5, default)
    Σ_t ω_t L_t  +  λ_s · mean_t mean_ℓ mean_c σ(α_t^ℓ)                        (``sparsity: l1``)

The network's weights are updated by the run's optimiser (``train:`` section); the gates (α, β)
by their own optimiser, stepped in the objective's ``after_step`` hook. Because the regulariser
averages over layers and channels, the λ_s that trades accuracy for FLOPs depends on the network
and the run length (``benchmarks/results/interrogate_defaults.md``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.engine.hooks import ObjectiveBase, StepOutput
from taskgrouping.methods.interrogate.network import GatedNetwork
from taskgrouping.methods.interrogate.options import GATE_OPTIMIZERS, SPARSITY_KINDS, InterroGateOptions
from taskgrouping.tasks import Task

__all__ = ["sparsity_loss", "make_gate_optimizer", "InterroGateObjective"]



def sparsity_loss(alphas: Sequence[Tensor], tau: Tensor | float, kind: str = "hinge") -> Tensor:
    """InterroGate's sparsity regulariser (without λ_s).

    ``u_t = mean_ℓ mean_c σ(α_t^ℓ)`` is task t's soft share of task-specific channels; ``hinge``
    returns ``mean_t max(0, u_t − τ_t)`` (paper Eq. 5: no pressure once the task is within its
    budget τ_t), ``l1`` returns ``mean_t u_t`` (the paper's ablation without a target).

    Args:
        alphas: gate logits per gated layer, each ``T × C_ℓ``.
        tau: per-task targets ``(T,)`` or one number.
    """
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity must be one of {list(SPARSITY_KINDS)}, got {kind!r}")
    if not alphas:
        raise ValueError("sparsity_loss needs the gate logits of at least one layer")
    usage = torch.stack([torch.sigmoid(a).mean(1) for a in alphas]).mean(0)
    if kind == "l1":
        return usage.mean()
    tau = torch.as_tensor(tau, dtype=usage.dtype, device=usage.device)
    return torch.relu(usage - tau).mean()


def make_gate_optimizer(params: Iterable[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
    """The gates' own optimiser: plain SGD (the paper's) or Adam."""
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"gate_optimizer must be one of {list(GATE_OPTIMIZERS)}, got {kind!r}")


class InterroGateObjective(ObjectiveBase):
    """The trainer's step for InterroGate (the loss is in the module docstring).

    The returned ``losses`` are the weighted task losses ``ω_t L_t`` (the balancer combines them);
    the sparsity term is the ``extra_loss``. The main optimiser sees only the network's weights
    (:meth:`param_groups`); :meth:`after_step` steps the gates' optimiser and clears their grads.
    """

    def __init__(self, model: GatedNetwork, tasks: Sequence[Task], options: InterroGateOptions,
                 base_lr: float | None = None) -> None:
        self.base_lr = base_lr
        self.tasks = {t.name: t for t in tasks}
        if list(self.tasks) != model.task_names:
            raise ValueError(f"the gated network's tasks {model.task_names} differ from {list(self.tasks)}")
        self.options = options
        tau = options.per_task("tau", tasks)
        self.tau = torch.tensor([tau[t] for t in model.task_names])
        self.omega = options.per_task("omega", tasks)
        self.lambda_s = float(options.lambda_s)
        self.gate_optimizer = make_gate_optimizer(model.gate_parameters(), options.gate_optimizer,
                                                  float(options.gate_lr))
        self._reg_sum = 0.0
        self._steps = 0

    def __call__(self, model: GatedNetwork, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        preds = model(x)
        losses = {t: self.omega[t] * task.loss(preds[t], targets[t]) for t, task in self.tasks.items()}
        extra = None
        if self.lambda_s > 0:
            alphas = [g.alpha for g in model.gate_points().values()]
            if self.tau.device != x.device:  # moved once, not copied every step
                self.tau = self.tau.to(x.device)
            extra = self.lambda_s * sparsity_loss(alphas, self.tau, self.options.sparsity)
            self._reg_sum = self._reg_sum + extra.detach().double()  # a tensor: no synchronisation every step
        self._steps += 1
        return StepOutput(losses, extra_loss=extra)

    def param_groups(self, model: GatedNetwork) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": model.weight_parameters()}
        if self.base_lr is not None and self.options.weight_lr_scale != 1.0:
            group["lr"] = self.base_lr * float(self.options.weight_lr_scale)
        return [group]

    def after_step(self) -> None:
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    def on_epoch_start(self, epoch: int, model: GatedNetwork) -> None:
        self._reg_sum, self._steps = 0.0, 0

    def on_epoch_end(self, epoch: int, model: GatedNetwork) -> dict[str, Any]:
        hard = model.hard_gates()
        names = model.task_names
        frac = {t: float(torch.stack([m[i].float().mean() for m in hard.values()]).mean()) for i, t in enumerate(names)}
        usage = model.gate_usage().detach()
        return {"gates": {"task_specific_fraction": frac, "soft_usage": dict(zip(names, usage.tolist())),
                          "sparsity_loss": float(self._reg_sum) / max(self._steps, 1)}}

    def state_dict(self) -> dict[str, Any]:
        sd = self.gate_optimizer.state_dict()
        state = {str(k): {n: (v.tolist() if isinstance(v, Tensor) else v) for n, v in st.items()}
                 for k, st in sd["state"].items()}
        return {"gate_optimizer": {"state": state, "param_groups": sd["param_groups"]}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        opt = state["gate_optimizer"]
        restored = {int(k): {n: torch.tensor(v, dtype=torch.float32) for n, v in st.items()}
                    for k, st in opt["state"].items()}
        self.gate_optimizer.load_state_dict({"state": restored, "param_groups": opt["param_groups"]})
