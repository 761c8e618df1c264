"""InterroGate's options (the config's ``interrogate:`` section), defaults written once.

The gates' defaults are not the paper's SGD at lr 0.1: at that rate and the paper's λ_s no gate
flips within a run on this package's benchmarks and the method silently stays at its initialisation
(single-task learning). Adam at lr 0.03 with gates starting near the threshold (α = 0.5) moves them
within a few epochs; ``gate_optimizer: sgd, gate_lr: 0.1`` gives the paper's setting. The
measurements behind this are in ``benchmarks/results/interrogate_defaults.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from taskgrouping.methods.options import MethodOptions, expect_choice, expect_int, expect_number
from taskgrouping.tasks import Task

if TYPE_CHECKING:
    from taskgrouping.data.base import TaskData

__all__ = ["InterroGateOptions", "SPARSITY_KINDS", "GATE_OPTIMIZERS", "INITS"]

SPARSITY_KINDS = ("hinge", "l1")
GATE_OPTIMIZERS = ("sgd", "adam")
INITS = ("baselines", "scratch")


def _check_per_task(key: str, value: Any, high: float | None) -> None:
    """``value`` is one number for every task or a ``{task: number}`` mapping, each in ``[0, high]``."""
    if isinstance(value, Mapping):
        for task, v in value.items():
            expect_number(f"{key}.{task}", v, low=0, high=high)
    else:
        expect_number(key, value, low=0, high=high)


@dataclass(frozen=True)
class InterroGateOptions(MethodOptions):
    """Options of the ``interrogate`` method.

    Attributes:
        lambda_s: λ_s, the weight of the sparsity loss (``objective.sparsity_loss``).
        tau: τ_t, the hinge's target share of task-specific channels: one number for every task or a
            ``{task: number}`` mapping covering every task, within [0, 1].
        sparsity: ``hinge`` (paper Eq. 5) or ``l1`` (the paper's ablation without a target).
        gate_lr: the gates' (α, β) learning rate.
        gate_optimizer: the gates' own optimiser, ``adam`` or ``sgd`` (the paper's).
        init: ``baselines`` (task branches from the run's single-task network, the shared branch
            from its naive-MTL network) or ``scratch``.
        omega: ω_t, task loss weights (one number or a ``{task: number}`` mapping; null = the
            tasks' own weights).
        gate_init: initial gate logit α (> 0: every task starts on its own branch).
        weight_lr_scale: the network weights' learning rate is ``train.lr`` times this (below 1
            fine-tunes the STL / MTL weights gently while the gates learn, which small datasets
            need: at the full rate they overfit before the gates move).
        epochs: length of the gated fine-tuning phase (null = ``train.epochs``).
    """

    #: the gated network has no ``forward_heads``: no shared features for the balancer
    gives_features: ClassVar[bool] = False

    lambda_s: float = 1.0
    tau: float | Mapping[str, float] = 0.2
    sparsity: str = "hinge"
    gate_lr: float = 0.03
    gate_optimizer: str = "adam"
    init: str = "baselines"
    omega: float | Mapping[str, float] | None = None
    gate_init: float = 0.5
    weight_lr_scale: float = 0.1
    epochs: int | None = None

    def __post_init__(self) -> None:
        expect_int("epochs", self.epochs, low=1, allow_none=True)
        expect_number("lambda_s", self.lambda_s, low=0)
        expect_number("gate_lr", self.gate_lr, low=0, low_open=True)
        expect_choice("sparsity", self.sparsity, SPARSITY_KINDS)
        expect_choice("gate_optimizer", self.gate_optimizer, GATE_OPTIMIZERS)
        expect_choice("init", self.init, INITS)
        _check_per_task("tau", self.tau, 1.0)
        if self.omega is not None:
            _check_per_task("omega", self.omega, None)
        expect_number("weight_lr_scale", self.weight_lr_scale, low=0, low_open=True)
        expect_number("gate_init", self.gate_init)

    def check_data(self, data: TaskData) -> None:
        self.check_tasks(data.task_names)

    def check_tasks(self, names: Sequence[str]) -> None:
        """A ``{task: number}`` ``tau`` or ``omega`` must name exactly the tasks ``names``."""
        for key in ("tau", "omega"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                continue
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ValueError(f"interrogate.{key} names unknown task(s) {unknown}; tasks are {list(names)}")
            missing = [n for n in names if n not in value]
            if missing:
                raise ValueError(f"interrogate.{key} has no value for task(s) {missing}; give a number for every "
                                 "task or a single number for all")

    def per_task(self, key: str, tasks: Sequence[Task]) -> dict[str, float]:
        """``tau`` or ``omega`` as a float for every task (``omega`` null: the tasks' weights)."""
        names = [t.name for t in tasks]
        self.check_tasks(names)
        value = getattr(self, key)
        if value is None:
            return {t.name: float(t.weight) for t in tasks}
        if isinstance(value, Mapping):
            return {n: float(value[n]) for n in names}
        return {n: float(value) for n in names}

    def resolved(self, tasks: Sequence[Task]) -> dict[str, Any]:
        """The options as results.json records them: numbers as floats, ``tau`` and ``omega`` per task."""
        return {"lambda_s": float(self.lambda_s), "tau": self.per_task("tau", tasks), "sparsity": self.sparsity,
                "gate_lr": float(self.gate_lr), "gate_optimizer": self.gate_optimizer, "init": self.init,
                "omega": self.per_task("omega", tasks), "gate_init": float(self.gate_init),
                "weight_lr_scale": float(self.weight_lr_scale)}
