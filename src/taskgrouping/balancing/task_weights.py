"""Learnable per-task weights and their optimiser, shared by the balancers that learn weights.

UW's log-variances, GradNorm's weights and IMTL's scales are trained by the main optimiser, so they
must exist before training starts: :class:`TaskVector` creates them at construction from the task
names (or their number). FAMO's logits and Auto-Lambda's lambdas follow their own update rule, a
small Adam (:class:`VectorAdam`) run inside ``backward``. All states are JSON-able (lists of floats).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

TaskSpec = Sequence[str] | int | None


def floats(value: Any, key: str, who: str) -> Tensor:
    """A balancer's state entry ``key`` as a flat float32 tensor; a ``ValueError`` naming ``who`` else."""
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
        t = floats(value, key, self.owner)
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
        self.m = None if state.get("m") is None else floats(state["m"], "adam.m", who)
        self.v = None if state.get("v") is None else floats(state["v"], "adam.v", who)


__all__ = ["TaskVector", "VectorAdam", "TaskSpec", "floats"]
