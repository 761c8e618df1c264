"""The balancer contract: per-task losses in, gradients on the model's parameters out.

The trainer calls, once per step::

    logs = balancer.backward(losses, shared_params, features)

``losses`` maps task name -> scalar loss (graph attached); ``shared_params`` are the parameters
several tasks read (stem and branches, not heads); ``features`` are the shared representations the
heads read (one tensor per branch), used by feature-level ("fast surrogate") methods. After
``backward`` every parameter's ``.grad`` holds the update direction; the trainer then steps the
optimiser. Balancers with learnable state expose it through :meth:`Balancer.extra_parameters`
(added to the main optimiser) and :meth:`state_dict` (saved in checkpoints).

Under ``torchrun`` (:mod:`taskgrouping.engine.distributed`) each rank runs ``backward`` on its slice
of the global batch: the losses it gets have the global batch's values and the gradients of the
rank's share, ``.grad`` of the network's parameters must receive the rank's share of the update
(the trainer adds the shares up), and a balancer that looks at per-task gradients reduces them over
:attr:`Balancer.ranks` before it computes anything from them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.engine.distributed import LOCAL, Ranks
from taskgrouping.option_values import check_factory_options, check_value
from taskgrouping.registry import import_modules


class Balancer:
    """Equal weighting (EW): the gradient of the plain sum of task losses."""

    name = "ew"
    #: True when the method needs per-task gradients (w.r.t. shared parameters or features).
    needs_grads = False
    #: True when the method reads the shared features rather than shared parameters.
    uses_features = False
    #: True when ``backward`` differentiates the gradients of the network (``create_graph``): PyTorch's fused
    #: attention kernels have no second derivative, so the trainer then runs the forward pass with the math one.
    double_backward = False
    #: The ranks training the network together (set by the trainer; one process by default).
    ranks: Ranks = LOCAL

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

_POSITIVE: dict[str, Any] = {"low": 0, "low_open": True}
#: Ranges of the numeric options whose balancers do not check them on construction (type, finiteness
#: and choices come from the annotations).
OPTION_BOUNDS: dict[str, dict[str, dict[str, Any]]] = {
    "famo": {"lr": _POSITIVE, "gamma": {"low": 0}, "eps": _POSITIVE},
    "auto_lambda": {"lr": _POSITIVE, "init": {"low": 0}},
    "gradnorm": {"alpha": {"low": 0}},
    "gradvac": {"eps": _POSITIVE},
    "cosreg": {"eps": _POSITIVE},
}


def register_balancer(name: str) -> Callable:
    """Decorator adding a balancer class (or factory) to :data:`BALANCERS`."""

    def deco(cls):
        BALANCERS[name] = cls
        return cls

    return deco


def get_balancer(name: str, tasks: Sequence[str] | None = None, **options: Any) -> Balancer:
    """Instantiate the balancer registered as ``name`` (case-insensitive).

    ``tasks`` (the task names) is passed to balancers that keep per-task state from the start
    (uncertainty weighting, GradNorm, IMTL); an unknown option, or a value that does not fit the
    option's annotation or the balancer's own checks, is a ``ValueError`` naming the balancer.
    """
    return make_balancer(name, options, tasks)


def make_balancer(name: Any, options: Mapping[str, Any] | None = None, tasks: Sequence[str] | None = None,
                  prefix: str = "") -> Balancer:
    """:func:`get_balancer` with the options as a mapping; every error is a one-line ``ValueError``
    whose option names carry ``prefix`` (``"balancer.options."`` for a config)."""
    import inspect

    import_modules("taskgrouping.balancing", ["catalogue"])  # every family registers itself on import
    if not isinstance(name, str) or name.lower() not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; expected one of {sorted(BALANCERS)}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"balancer {name!r}: {prefix.rstrip('.') or 'options'} must be a mapping of options, "
                         f"got {options!r}")
    options = dict(options or {})
    factory = BALANCERS[name.lower()]
    if tasks is not None and "tasks" in inspect.signature(factory).parameters and "tasks" not in options:
        options["tasks"] = list(tasks)
    check_factory_options(factory, options, f"balancer {name!r}", prefix)
    for key, bounds in OPTION_BOUNDS.get(name.lower(), {}).items():
        if options.get(key) is not None:
            try:
                check_value(prefix + key, options[key], float, **bounds)
            except ValueError as exc:
                raise ValueError(f"balancer {name!r}: {exc}") from None
    try:
        return factory(**options)
    except (TypeError, ValueError, ArithmeticError) as exc:
        msg = " ".join(str(exc).split())
        head = f"balancer {name!r}: "
        rest = msg[len(head):] if msg.startswith(head) else msg
        if prefix and rest.split(" ", 1)[0] in options:  # "lam must be >= 0" -> "balancer.options.lam must ..."
            rest = prefix + rest
        raise ValueError(head + rest if msg.startswith(head) or not msg.startswith("balancer") else msg) from None


def check_on_tasks(balancer: Balancer, tasks: Sequence[str]) -> None:
    """One ``backward`` of ``balancer`` on a tiny synthetic problem with ``tasks`` (a shared layer,
    its features and one head per task; torch's RNG restored), so that options that only meet the
    task list in ``backward`` (AutoLambda's ``primary``, CosReg's ``hvp_tasks``, a missing solver)
    fail before training. Use a fresh balancer: this one's state has taken a step."""
    with torch.random.fork_rng(devices=[]):
        w = nn.Parameter(torch.linspace(-1.0, 1.0, 6).reshape(3, 2))
        feats = torch.tanh(torch.linspace(0.5, 1.5, 8).reshape(4, 2) @ w.T)
        heads = [nn.Parameter(torch.full((3,), 0.1 * (i + 1))) for i in range(len(tasks))]
        losses = {t: (feats @ h - i).square().mean() for i, (t, h) in enumerate(zip(tasks, heads))}
        try:
            balancer.backward(losses, [w], [feats])
        except ValueError:
            raise
        except (TypeError, RuntimeError, ArithmeticError, ImportError) as exc:
            raise ValueError(f"balancer {balancer.name!r} fails a check step on {len(tasks)} tasks: "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
