"""Accumulating TAG's lookahead affinities over training (Fifty et al., NeurIPS 2021, Section 3.1).

:class:`AffinityAccumulator` averages the per-step affinities (Eq. 3,
:func:`~taskgrouping.methods.tag.lookahead.lookahead_affinity`) within an epoch and sums the epoch
means over training; :class:`AffinityCollector` is the trainer callback that measures them during
a naive-MTL training without changing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.engine.hooks import CallbackBase, TaskLossObjective
from taskgrouping.io import atomic_write_json
from taskgrouping.methods.tag.affinity_table import to_file_form
from taskgrouping.methods.tag.lookahead import lookahead_affinity
from taskgrouping.tasks import Task

__all__ = ["LOOKAHEADS", "AffinityAccumulator", "AffinityCollector"]

LOOKAHEADS = ("optimizer", "sgd")


@dataclass
class AffinityAccumulator:
    """Averages lookahead affinities within an epoch and sums the epoch means over training.

    This is TAG's accumulation: the selection reads the integral over training of the per-epoch
    mean affinity (the authors' Taskonomy table has a diagonal of ~9.8 = 1 per epoch x ~10 epochs
    when divided by the learning rate).

    Usage::

        acc = AffinityAccumulator(task_names)
        for epoch ...:
            for step, batch ...:
                if step % 10 == 0:
                    acc.update(lookahead_affinity(model, shared, losses_fn, batch, lr))
            acc.end_epoch()
        grouping = select_groups(acc.total.numpy(), acc.tasks, k=3)
    """

    tasks: list[str]
    _epoch_sum: Tensor = field(init=False, repr=False)
    _epoch_count: int = field(init=False, default=0, repr=False)
    _total: Tensor = field(init=False, repr=False)
    epochs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of unique names, got {self.tasks}")
        n = len(self.tasks)
        self._epoch_sum = torch.zeros(n, n, dtype=torch.float64)
        self._total = torch.zeros(n, n, dtype=torch.float64)

    def update(self, affinity: Tensor) -> None:
        """Add one step's ``[source, recipient]`` affinity matrix to the current epoch."""
        n = len(self.tasks)
        if tuple(affinity.shape) != (n, n):
            raise ValueError(f"expected an affinity of shape ({n}, {n}) for tasks {self.tasks}, "
                             f"got {tuple(affinity.shape)}")
        self._epoch_sum += affinity.detach().to("cpu", torch.float64)
        self._epoch_count += 1

    def end_epoch(self) -> Tensor | None:
        """Close the epoch: add its mean to the running total; returns that mean (None if empty)."""
        if self._epoch_count == 0:
            return None
        mean = self._epoch_sum / self._epoch_count
        self._total += mean
        self.epochs += 1
        self._epoch_sum.zero_()
        self._epoch_count = 0
        return mean

    @property
    def total(self) -> Tensor:
        """Sum over closed epochs of the per-epoch mean affinity, ``[source, recipient]``."""
        return self._total.clone()

    def to_mapping(self) -> dict[str, dict[str, float]]:
        """The total in the TAG file form ``{recipient: {source: value}}``."""
        return to_file_form(self._total, self.tasks)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_mapping` as JSON (readable by
        :func:`~taskgrouping.methods.tag.affinity_table.load_affinity`)."""
        atomic_write_json(path, self.to_mapping())


class AffinityCollector(CallbackBase):
    """Trainer callback measuring TAG's lookahead affinity before the forward pass of every
    ``every``-th step and accumulating it per epoch.

    The trainer hands it the training optimiser (``on_train_start``); that optimiser's live learning
    rate (schedules included) and state drive the lookahead.
    """

    def __init__(self, tasks: Sequence[Task], shared: Sequence[nn.Parameter], *, every: int = 1,
                 lookahead: str = "sgd", divide_by_lr: bool = True, lr: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"tag.lookahead must be one of {list(LOOKAHEADS)}, got {lookahead!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"tag.every must be a positive integer (measure every k-th step), got {every!r}")
        self.tasks = list(tasks)
        self.names = [t.name for t in self.tasks]
        self.shared = list(shared)
        self.every, self.lookahead, self.divide_by_lr = every, lookahead, bool(divide_by_lr)
        self.lr, self.weight_decay, self.seed = float(lr), float(weight_decay), int(seed)
        self.objective = TaskLossObjective(self.tasks)
        self.accumulator = AffinityAccumulator(self.names)
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch_means: list[list[list[float]] | None] = []
        self.steps = self.skipped = 0
        self._epoch_steps = 0

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def _current_lr(self) -> float:
        if self.optimizer is None:
            return self.lr
        for g in self.optimizer.param_groups:
            if any(p is self.shared[0] for p in g["params"]):
                return float(g["lr"])
        return self.lr

    # -- trainer hooks --------------------------------------------------------------------------
    def on_batch_start(self, step: int, model: nn.Module, batch: tuple[Tensor, dict[str, Tensor]]) -> None:
        if step % self.every:
            return
        x, targets = batch
        if self.lookahead == "optimizer" and self.optimizer is None:
            self.skipped += 1
            return
        if any(not _has_label(t, targets[t.name]) for t in self.tasks):
            self.skipped += 1  # a task without a label in this batch has no loss ratio
            return
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []

        def losses(m: nn.Module, b: Any) -> dict[str, Tensor]:
            with torch.random.fork_rng(devices=devices):  # same dropout noise before and after; RNG untouched
                torch.manual_seed(self.seed + step)
                return self.objective(m, b[0], b[1]).losses

        lr = self._current_lr()
        if self.lookahead == "optimizer":
            mode = "adam_aware" if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)) else "sgd"
            if mode == "sgd" and not isinstance(self.optimizer, torch.optim.SGD):
                raise ValueError(f"tag.lookahead='optimizer' supports Adam, AdamW and SGD, not "
                                 f"{type(self.optimizer).__name__}; use tag.lookahead='sgd'")
            z = lookahead_affinity(model, self.shared, losses, batch, lr, mode=mode, optimizer=self.optimizer,
                                   divide_by_lr=self.divide_by_lr)
        else:
            z = lookahead_affinity(model, self.shared, losses, batch, lr, mode="sgd",
                                   weight_decay=self.weight_decay, divide_by_lr=self.divide_by_lr)
        self.accumulator.update(z)
        self.steps += 1
        self._epoch_steps += 1

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        mean = self.accumulator.end_epoch()
        self.epoch_means.append(None if mean is None else mean.tolist())
        record = {"tag_lookahead_steps": self._epoch_steps}
        if mean is not None:
            record["tag_affinity_epoch_mean"] = to_file_form(mean, self.names)
        self._epoch_steps = 0
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_means": self.epoch_means, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the accumulator from the saved epoch means (replaying them gives the same total)."""
        self.accumulator = AffinityAccumulator(self.names)
        self.epoch_means = list(state["epoch_means"])
        for mean in self.epoch_means:
            if mean is not None:
                self.accumulator.update(torch.tensor(mean, dtype=torch.float64))
                self.accumulator.end_epoch()
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])


def _has_label(task: Task, target: Tensor) -> bool:
    if task.is_classification:
        return bool((target >= 0).any())
    return bool((~torch.isnan(target)).any())
