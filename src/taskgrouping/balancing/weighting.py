"""Loss-weighting methods: the update is the gradient of ``sum_t w_t L_t`` for task weights ``w``
chosen by the method (Mao et al. 2024's and InterroGate's weighting baselines).

Registered names: ``uw`` (uncertainty), ``dwa``, ``rlw``, ``famo``, ``gradnorm``, ``auto_lambda``.
UW, DWA, RLW and FAMO need one backward, like EW. GradNorm also takes each task's gradient norm
at the last shared layer (or, with ``feature_level=True``, at the shared features). Auto-Lambda
needs the task Gramian, so it is a gradient balancer with both levels.

Learnable weights trained by the main optimiser (UW's log-variances, GradNorm's weights, IMTL's
scales) must exist before training starts, so these balancers take ``tasks`` (the task names, or
their number) at construction. Weights with their own update rule (FAMO's logits, Auto-Lambda's
lambdas) are updated inside :meth:`backward` with a small Adam whose state is part of
:meth:`state_dict`. All states are JSON-able (lists of floats).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.balancing.base import Balancer, register_balancer
from taskgrouping.balancing.jacobian import GradientBalancer, check_losses

TaskSpec = Sequence[str] | int | None


def _floats(value: Any, key: str, who: str) -> Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"balancer {who!r}: state entry {key!r} must be a list of numbers ({exc})") from None
    if t.ndim != 1:
        raise ValueError(f"balancer {who!r}: state entry {key!r} must be a flat list, got shape {tuple(t.shape)}")
    return t


class TaskVector:
    """One learnable value per task, created at construction so an optimiser can hold it.

    ``tasks`` are the task names (losses are matched by name) or their number (matched by
    position). Without them the vector is created on the first backward, which is only allowed
    when nobody asks for :meth:`parameter` before that.
    """

    def __init__(self, owner: str, tasks: TaskSpec, init: float) -> None:
        self.owner, self.init = owner, float(init)
        self.names: list[str] | None = None
        self.param: nn.Parameter | None = None
        if tasks is not None:
            if isinstance(tasks, int):
                n = tasks
            else:
                self.names = [str(t) for t in tasks]
                n = len(self.names)
                if len(set(self.names)) != n:
                    raise ValueError(f"balancer {owner!r}: tasks lists a name twice: {self.names}")
            if n < 1:
                raise ValueError(f"balancer {owner!r}: tasks must name at least one task, got {tasks!r}")
            self.param = nn.Parameter(torch.full((n,), self.init))

    def parameter(self) -> nn.Parameter:
        if self.param is None:
            raise ValueError(f"balancer {self.owner!r} has learnable per-task weights that the optimiser must hold "
                             f"from the start; construct it with tasks=[task names] (or the number of tasks)")
        return self.param

    def order(self, names: list[str]) -> list[int]:
        """Indices into the vector for the losses ``names`` (in that order)."""
        if self.param is None:
            self.param = nn.Parameter(torch.full((len(names),), self.init))
        if self.names is not None:
            missing = [n for n in names if n not in self.names]
            if missing or len(names) != len(self.names):
                raise ValueError(f"balancer {self.owner!r} was built for tasks {self.names} but got losses for "
                                 f"{names}")
            return [self.names.index(n) for n in names]
        if len(names) != self.param.numel():
            raise ValueError(f"balancer {self.owner!r} was built for {self.param.numel()} tasks but got "
                             f"{len(names)} losses ({names})")
        return list(range(len(names)))

    def values(self, names: list[str], device: torch.device) -> Tensor:
        p = self.order(names)
        param = self.param
        if param.device != device:
            with torch.no_grad():
                param.data = param.data.to(device)
        return param[p]

    def state(self) -> Any:
        return None if self.param is None else self.param.detach().cpu().tolist()

    def load(self, value: Any, key: str) -> None:
        if value is None:
            return
        t = _floats(value, key, self.owner)
        if self.param is None:
            self.param = nn.Parameter(t.clone())
        elif self.param.numel() != t.numel():
            raise ValueError(f"balancer {self.owner!r}: state entry {key!r} has {t.numel()} values, "
                             f"expected {self.param.numel()} (one per task)")
        else:
            with torch.no_grad():
                self.param.copy_(t.to(self.param.device))


class VectorAdam:
    """Adam (Kingma & Ba 2015, with L2 weight decay added to the gradient, as ``torch.optim.Adam``)
    for one small vector updated inside a balancer; its state is plain lists."""

    def __init__(self, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.t = 0

    def step(self, x: Tensor, grad: Tensor) -> Tensor:
        grad = grad + self.weight_decay * x
        if self.m is None:
            self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        return x - self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state(self) -> dict[str, Any]:
        return {"t": self.t, "m": None if self.m is None else self.m.tolist(),
                "v": None if self.v is None else self.v.tolist()}

    def load(self, state: dict[str, Any], who: str) -> None:
        self.t = int(state.get("t", 0))
        self.m = None if state.get("m") is None else _floats(state["m"], "adam.m", who)
        self.v = None if state.get("v") is None else _floats(state["v"], "adam.v", who)


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
        self.min_losses = None if min_losses is None else _floats(list(min_losses), "min_losses", self.name)
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
        self.logits = None if state.get("logits") is None else _floats(state["logits"], "logits", self.name)
        prev = state.get("prev_losses")
        self.prev_losses = None if prev is None else _floats(prev, "prev_losses", self.name)
        self.adam.load(state.get("adam", {}), self.name)


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
    :class:`~taskgrouping.balancing.jacobian.GradientBalancer` (trunk: one backward of
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
            for loss in loss_list:
                grads = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True) \
                    if loss.requires_grad else [None] * len(layer)
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
        self.lambdas = None if lam is None else _floats(lam, "lambdas", self.name)
        self.adam.load(state.get("adam", {}), self.name)


__all__ = ["UncertaintyWeighting", "RandomLossWeighting", "DynamicWeightAverage", "FAMO", "GradNorm", "AutoLambda",
           "LossWeighting", "TaskVector", "VectorAdam", "TaskSpec"]
