"""Scoring a model on a split: per-task metrics from the tasks' own meters.

Under ``torchrun`` a loader sharded over the ranks (:func:`~taskgrouping.data.base.make_loader` with
``shard``) gives each rank a slice of the split; the ranks' meters are then merged (sums and counts
added, the scores of the ranking metrics gathered), so every rank reports the whole split's metrics.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from taskgrouping.data.base import loader_shard
from taskgrouping.device import model_device
from taskgrouping.engine.distributed import Ranks
from taskgrouping.tasks import Task, TaskMeter

Predict = Callable[[nn.Module, Tensor], dict[str, Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, tasks: Iterable[Task],
             predict: Callable[[nn.Module, Tensor], dict[str, Tensor]] | None = None,
             device: torch.device | str | None = None) -> dict[str, dict[str, float]]:
    """Task name -> metrics over ``loader`` (model in eval mode; sums, not means of batch means); the
    batches are moved to ``device``, by default the model's."""
    device = device if device is not None else model_device(model)
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
    if loader_shard(loader)[1] > 1:
        merge_meters(meters, Ranks.current())
    return {name: m.compute() for name, m in meters.items()}


def merge_meters(meters: Mapping[str, TaskMeter], ranks: Ranks) -> None:
    """Make every rank's meters those of the ranks' batches together, in place: numbers and tensors
    (sums, counts, confusion matrices, histograms) are added, lists (the scores and labels that
    AUROC and average precision rank, which do not depend on their order) concatenated in rank order."""
    states = ranks.all_objects({name: {k: v for k, v in vars(m).items() if k != "task"} for name, m in meters.items()})
    for name, meter in meters.items():
        for key in states[0][name]:
            values = [s[name][key] for s in states if s[name][key] is not None]
            if not values:
                merged = None
            elif isinstance(values[0], list):
                merged = [item for v in values for item in v]
            else:
                merged = values[0]
                for v in values[1:]:
                    merged = merged + v
            setattr(meter, key, merged)


def total_loss(metrics: Mapping[str, Mapping[str, float]]) -> float:
    return float(sum(m["loss"] for m in metrics.values()))

