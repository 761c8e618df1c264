"""The balancer contract: per-task losses in, gradients on the model's parameters out.

The trainer calls, once per step::

    logs = balancer.backward(losses, shared_params, features)

``losses`` maps task name -> scalar loss (graph attached); ``shared_params`` are the parameters
several tasks read (stem and branches, not heads); ``features`` are the shared representations the
heads read (one tensor per branch), used by feature-level ("fast surrogate") methods. After
``backward`` every parameter's ``.grad`` holds the update direction; the trainer then steps the
optimiser. Balancers with learnable state expose it through :meth:`Balancer.extra_parameters`
(added to the main optimiser) and :meth:`state_dict` (saved in checkpoints).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.registry import check_options, import_modules


class Balancer:
    """Equal weighting (EW): the gradient of the plain sum of task losses."""

    name = "ew"
    #: True when the method needs per-task gradients (w.r.t. shared parameters or features).
    needs_grads = False
    #: True when the method reads the shared features rather than shared parameters.
    uses_features = False

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[Tensor],
                 features: Sequence[Tensor] | None = None) -> dict[str, float]:
        """Write gradients into ``.grad`` of every parameter; return scalars worth logging."""
        torch.stack(list(losses.values())).sum().backward()
        return {}

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable parameters of the balancer itself (e.g. uncertainty weights)."""
        return []

    def on_epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        """Hook for methods that reweight from epoch-level loss history (DWA)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


BALANCERS: dict[str, Callable[..., Balancer]] = {"ew": Balancer}


def register_balancer(name: str) -> Callable:
    """Decorator adding a balancer class (or factory) to :data:`BALANCERS`."""

    def deco(cls):
        BALANCERS[name] = cls
        return cls

    return deco


def get_balancer(name: str, tasks: Sequence[str] | None = None, **options: Any) -> Balancer:
    """Instantiate the balancer registered as ``name`` (case-insensitive).

    ``tasks`` (the task names) is passed to balancers that keep per-task state from the start
    (uncertainty weighting, GradNorm, IMTL); unknown options are a ``ValueError`` naming the balancer.
    """
    import inspect

    import_modules("taskgrouping.balancing", ["catalogue"])  # every family registers itself on import
    key = name.lower()
    if key not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; expected one of {sorted(BALANCERS)}")
    factory = BALANCERS[key]
    if tasks is not None and "tasks" in inspect.signature(factory).parameters and "tasks" not in options:
        options = dict(options, tasks=list(tasks))
    check_options(factory, options, f"balancer {name!r}")
    return factory(**options)
