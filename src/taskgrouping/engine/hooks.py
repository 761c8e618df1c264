"""What the training loop calls besides the model: the method's *objective* and *callbacks*.

Both are typed protocols with every hook spelled out; :class:`ObjectiveBase` and
:class:`CallbackBase` give the no-op defaults, so a method overrides only the hooks it needs and the
trainer calls every hook unconditionally (no ``hasattr`` probing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from taskgrouping.tasks import Task, valid_counts

Batch = tuple[Tensor, dict[str, Tensor]]


@dataclass
class StepOutput:
    """What an objective returns for one batch.

    Attributes:
        losses: task name -> scalar loss (graph attached); the balancer combines them.
        features: branch index -> shared features the heads read (for feature-level balancers).
        extra_loss: a regulariser added to the combined loss as is (e.g. an entropy term).
    """

    losses: dict[str, Tensor]
    features: dict[int, Tensor] = field(default_factory=dict)
    extra_loss: Tensor | None = None


@runtime_checkable
class Objective(Protocol):
    """A method's training step and its hooks (all called by the trainer)."""

    def __call__(self, model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> StepOutput: ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """What the main optimiser updates."""
        ...

    def after_step(self) -> None:
        """After the optimiser step (e.g. step the method's own optimiser, zeroing its grads)."""
        ...

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None: ...

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, Any] | None:
        """Facts merged into the epoch's log record. The trainer reads three of them: ``selectable: False``
        (the epoch is not a candidate for the returned model while a later one is, and does not count
        towards early stopping), ``rewind: True`` (continue from the best epoch so far) and ``extend: True``
        (one more epoch than planned: the run may go past ``train.epochs``)."""
        ...

    def after_validation(self, epoch: int, model: nn.Module, val: dict[str, dict[str, float]]
                         ) -> dict[str, Any] | None:
        """After the epoch's validation (``val``: task -> metrics): facts merged into its log record. The
        trainer reads ``stop: True`` (end training after this epoch, e.g. when every candidate network of a
        stack has run out of patience)."""
        ...

    def state_dict(self) -> dict[str, Any] | None:
        """JSON-able state saved in checkpoints (``None``: nothing to save)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ObjectiveBase:
    """No-op defaults of every :class:`Objective` hook; ``__call__`` is the method's own."""

    def __call__(self, model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def after_step(self) -> None:
        return None

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        return None

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, Any] | None:
        return None

    def after_validation(self, epoch: int, model: nn.Module, val: dict[str, dict[str, float]]
                         ) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@runtime_checkable
class Callback(Protocol):
    """Observers of training (TAG's lookahead affinity, Mao et al.'s diagnostics)."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once, after a resume has been restored."""
        ...

    def on_batch_start(self, step: int, model: nn.Module, batch: Batch) -> None:
        """Before the forward pass; may change parameters temporarily if it restores them."""
        ...

    def on_step(self, step: int, output: StepOutput, model: nn.Module, batch: Batch) -> None:
        """After the forward pass, graph alive, before the backward pass; must not touch ``.grad``
        (use ``torch.autograd.grad`` with ``retain_graph=True``)."""
        ...

    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        """Facts merged into the epoch's log record."""
        ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackBase:
    """No-op defaults of every :class:`Callback` hook."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    def on_batch_start(self, step: int, model: nn.Module, batch: Batch) -> None:
        return None

    def on_step(self, step: int, output: StepOutput, model: nn.Module, batch: Batch) -> None:
        return None

    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def labelled_tasks(tasks: Iterable[Task], targets: dict[str, Tensor]) -> set[str]:
    """Names of the ``tasks`` with at least one valid label in ``targets`` (one device sync)."""
    tasks = [t for t in tasks if t.name in targets]
    if not tasks:
        return set()
    return {t.name for t, n in zip(tasks, valid_counts(tasks, targets).tolist()) if n > 0}


class TaskLossObjective(ObjectiveBase):
    """Each task's loss from every head that trains it (a branched model's ``groups``), or from the
    plain ``{task: prediction}`` dict returned by any other model.

    A task without any label in the batch (a long table's batch holds rows of a few tasks) gets a
    constant zero loss, as its NaN-masked loss would be, without running its heads: a model with
    ``all_head_keys()`` and ``forward_heads(x, keys)`` (the
    :class:`~taskgrouping.models.branched.BranchedModel`) runs only the labelled tasks' heads and the
    branches serving them. Every task keeps its entry, so balancers that track tasks see all of them
    every step (a zero loss has a zero gradient).
    """

    def __init__(self, tasks: Iterable[Task]) -> None:
        self.tasks = {t.name: t for t in tasks}

    def __call__(self, model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        present = labelled_tasks(self.tasks.values(), targets)
        absent = {t for t in self.tasks if t in targets and t not in present} if present else set()
        zero = torch.zeros((), device=x.device)
        forward_heads = getattr(model, "forward_heads", None)
        if forward_heads is not None:
            all_keys = getattr(model, "all_head_keys", None)
            if all_keys is not None and absent:
                preds, feats = forward_heads(x, [(k, t) for k, t in all_keys() if t not in absent])
            else:
                preds, feats = forward_heads(x)
            losses: dict[str, Tensor] = {}
            for (k, t), p in preds.items():
                if t not in absent:
                    loss = self.tasks[t].loss(p, targets[t])
                    losses[t] = losses[t] + loss if t in losses else loss
            trained = set(losses) | absent
            return StepOutput({t: losses.get(t, zero) for t in self.tasks if t in trained}, feats)
        preds = model(x)
        return StepOutput({t: zero if t in absent else self.tasks[t].loss(preds[t], targets[t]) for t in self.tasks})
