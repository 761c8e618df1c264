"""TAG's lookahead inter-task affinity on one batch (Fifty et al., NeurIPS 2021, Eq. 3)::

    Z[i, j] = 1 - L_j(batch; theta_s - step_i) / L_j(batch; theta_s)

where ``step_i`` is the optimiser step of the *shared* parameters ``theta_s`` computed from
``L_i``'s gradient alone: a plain SGD step, the momentum-aware SGD step or the step Adam/AdamW
would take next (TAG's CelebA setting), computed without touching the optimiser's state.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.balancing.task_gradients import iter_task_grads

__all__ = ["lookahead_affinity"]


def _sgd_direction(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float,
                   optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    """The parameter change an SGD step would make with these gradients (state is not touched)."""
    group_of = _group_lookup(optimizer, params) if optimizer is not None else None
    deltas = []
    for p, g in zip(params, grads):
        if group_of is None:
            d = g + weight_decay * p if weight_decay else g
            deltas.append(-lr * d)
            continue
        grp = group_of[p]
        if grp.get("maximize", False):
            raise ValueError("lookahead does not support optimisers with maximize=True")
        wd, mom = grp.get("weight_decay", 0.0), grp.get("momentum", 0.0)
        d = g + wd * p if wd else g
        if mom:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = d if buf is None else mom * buf + (1 - grp.get("dampening", 0.0)) * d
            d = d + mom * buf if grp.get("nesterov", False) else buf
        deltas.append(-lr * d)
    return deltas


def _adam_direction(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float,
                    optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameter change the next Adam/AdamW step would make with these gradients.

    Uses the optimiser's running moments and step count (Kingma & Ba, Alg. 1) without changing them.
    """
    group_of = _group_lookup(optimizer, params)
    decoupled_default = isinstance(optimizer, torch.optim.AdamW)
    deltas = []
    for p, g in zip(params, grads):
        grp = group_of[p]
        if grp.get("maximize", False):
            raise ValueError("lookahead does not support optimisers with maximize=True")
        beta1, beta2 = grp["betas"]
        eps, wd = grp["eps"], grp.get("weight_decay", 0.0)
        decoupled = decoupled_default or grp.get("decoupled_weight_decay", False)
        if wd and not decoupled:
            g = g + wd * p
        state = optimizer.state.get(p, {})
        step = float(state["step"]) if "step" in state else 0.0
        m = state.get("exp_avg", torch.zeros_like(p))
        v = state.get("exp_avg_sq", torch.zeros_like(p))
        step += 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if grp.get("amsgrad", False):
            v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), v)
        denom = (v / (1 - beta2 ** step)).sqrt() + eps
        d = -lr * (m / (1 - beta1 ** step)) / denom
        if wd and decoupled:
            d = d - lr * wd * p
        deltas.append(d)
    return deltas


def _group_lookup(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[Tensor, dict]:
    lookup: dict[Tensor, dict] = {}
    for grp in optimizer.param_groups:
        for q in grp["params"]:
            lookup[q] = grp
    missing = [i for i, p in enumerate(params) if p not in lookup]
    if missing:
        raise ValueError(f"shared parameters at positions {missing} are not managed by the given optimizer")
    return lookup


def lookahead_affinity(model: nn.Module, shared_params: Sequence[Tensor],
                       losses_fn: Callable[[nn.Module, Any], Mapping[str, Tensor]], batch: Any,
                       lr: float | None, *, mode: Literal["sgd", "adam_aware"] = "sgd",
                       optimizer: torch.optim.Optimizer | None = None, divide_by_lr: bool = False,
                       weight_decay: float = 0.0) -> Tensor:
    """TAG's lookahead inter-task affinity on one batch (Fifty et al. 2021, Eq. 3).

    ``Z[i, j] = 1 - L_j(after_i) / L_j(before)``: ``after_i`` is the model after one step of the
    shared parameters only, driven by source task ``i``'s gradient alone; both losses come from
    ``losses_fn(model, batch)`` on the same batch. Positive = task ``i``'s step helps task ``j``.

    Args:
        model: the multi-task model; ``losses_fn(model, batch)`` returns ``{task: scalar loss}`` and
            fixes the task order of the result.
        shared_params: the parameters the lookahead step moves (heads stay put, as in TAG).
        lr: step size; ``None`` takes the optimiser's learning rate.
        mode: ``"sgd"`` = plain gradient step (with ``weight_decay``); when an ``torch.optim.SGD``
            ``optimizer`` is given its momentum buffer, dampening, Nesterov and weight decay are used
            (momentum-aware lookahead). ``"adam_aware"`` = the step the given Adam/AdamW would take
            next with this gradient (its moments and step count; the TAG CelebA setting).
        divide_by_lr: divide the affinities by ``lr`` (as the authors' code does; only ratios
            matter for selection).

    Returns:
        ``Tensor[N, N]`` (float64, CPU), indexed ``[source, recipient]``.

    Side effects: none that survive the call — the shared parameters are restored bit-for-bit
    and every buffer (e.g. BatchNorm running statistics) is restored; the optimiser state and
    ``.grad`` fields are not touched. ``losses_fn`` runs ``N + 1`` times, so make it
    deterministic (e.g. model in eval mode, or no dropout) for meaningful values.
    """
    params = list(shared_params)
    if not params:
        raise ValueError("lookahead_affinity needs at least one shared parameter")
    if mode not in ("sgd", "adam_aware"):
        raise ValueError(f"mode must be 'sgd' or 'adam_aware', got {mode!r}")
    if mode == "adam_aware" and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"mode='adam_aware' needs a torch.optim.Adam or AdamW optimizer, got {type(optimizer).__name__}")
    if mode == "sgd" and optimizer is not None and not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"mode='sgd' takes an optional torch.optim.SGD optimizer, got {type(optimizer).__name__}")
    if lr is None:
        if optimizer is None:
            raise ValueError("lr=None needs an optimizer to read the learning rate from")
        lr = float(optimizer.param_groups[0]["lr"])
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")

    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        before = dict(losses_fn(model, batch))
        if not before:
            raise ValueError("losses_fn returned no losses")
        names = list(before)
        for t, loss in before.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"losses_fn must return scalar tensors; task {t!r} gave {loss!r}")
        base = torch.stack([before[t].detach().double().reshape(()) for t in names])
        zero_base = [t for t, v in zip(names, base.tolist()) if v == 0.0]
        if zero_base:
            raise ValueError(f"loss of tasks {zero_base} is exactly 0 before the step; the affinity ratio is undefined")
        n = len(names)
        # every gradient is taken before any parameter moves (in-place steps invalidate the graph)
        for source in names:
            if not before[source].requires_grad:
                raise ValueError(f"the loss of task {source!r} does not depend on any parameter requiring grad")
        all_grads = [[torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
                     for grads in iter_task_grads([before[t] for t in names], params, retain_graph=False, names=names)]
        out = torch.empty(n, n, dtype=torch.float64)
        for i, grads in enumerate(all_grads):
            with torch.no_grad():
                if mode == "adam_aware":
                    deltas = _adam_direction(params, grads, lr, optimizer)
                else:
                    deltas = _sgd_direction(params, grads, lr, weight_decay, optimizer)
                for p, d in zip(params, deltas):
                    p.add_(d)
                after = losses_fn(model, batch)
                missing = [t for t in names if t not in after]
                if missing:
                    raise ValueError(f"losses_fn returned no loss for tasks {missing} after the lookahead step")
                out[i] = 1.0 - torch.stack([after[t].detach().double().reshape(()) for t in names]) / base
                for p, s in zip(params, saved_params):
                    p.copy_(s)
                for b, s in saved_buffers:
                    b.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
            for b, s in saved_buffers:
                b.copy_(s)
    if divide_by_lr:
        out /= lr
    return out
