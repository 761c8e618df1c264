"""Scoring a model on a split: per-task metrics from the tasks' own meters."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from taskgrouping.tasks import Task

Predict = Callable[[nn.Module, Tensor], dict[str, Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, tasks: Iterable[Task],
             predict: Callable[[nn.Module, Tensor], dict[str, Tensor]] | None = None,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Task name -> metrics over ``loader`` (model in eval mode; sums, not means of batch means)."""
    tasks = list(tasks)
    meters = {t.name: t.meter() for t in tasks}
    was_training = model.training
    model.eval()
    for x, targets in loader:
        x = x.to(device)
        preds = predict(model, x) if predict is not None else model(x)
        for t in tasks:
            meters[t.name].update(preds[t.name].float().cpu(), targets[t.name])
    model.train(was_training)
    return {name: m.compute() for name, m in meters.items()}


def total_loss(metrics: Mapping[str, Mapping[str, float]]) -> float:
    return float(sum(m["loss"] for m in metrics.values()))

