"""The one way a network is trained: build it, build its loaders and balancer, train, score.

Every method's networks go through :func:`fit` — in process (the methods), as fanned-out jobs of
the two-shot methods (:mod:`taskgrouping.engine.jobs`), and the balancer study — so diagnostics,
balancers and checkpoints behave the same for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from taskgrouping.balancing.base import get_balancer
from taskgrouping.data.base import TaskData, make_loader
from taskgrouping.engine.evaluation import Predict, evaluate
from taskgrouping.engine.hooks import Callback
from taskgrouping.engine.distributed import Ranks, check_batches
from taskgrouping.engine.trainer import TrainConfig, TrainResult, resolve_device, train
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.models.branched import BranchedModel, build_branched_model
from taskgrouping.tasks import Task

__all__ = ["RunContext", "Fitted", "build_model", "fit", "loader_factory"]


@dataclass(frozen=True)
class RunContext:
    """What every network of one run shares (picklable: shipped once to each worker of a fan-out).

    Attributes:
        data: the dataset.
        seed: the run seed (models are initialised from it; the trainer reseeds every epoch).
        train: optimisation settings.
        model: the config's ``model`` section (``backbone``, ``options``, ``shared_blocks``).
        balancer: the config's ``balancer`` section (``name``, ``options``).
        diagnostics: the config's ``diagnostics`` section (``every``, ``level``).
        data_key: a fingerprint of the data (what the job cache keys on; ``""``: unknown, no caching).
    """

    data: TaskData
    seed: int
    train: TrainConfig
    model: Mapping[str, Any] = field(default_factory=dict)
    balancer: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    data_key: str = ""


class Fitted(NamedTuple):
    """A trained network: the trainer's result and the selected epoch's validation / test metrics
    (``test`` is ``None`` when the test split was not scored)."""

    result: TrainResult
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]] | None

    @property
    def model(self) -> nn.Module:
        return self.result.model


def build_model(run: RunContext, grouping: Grouping, model_options: Mapping[str, Any] | None = None
                ) -> BranchedModel:
    """A freshly initialised branched model for ``grouping`` (torch seeded with the run seed first,
    so every network of a run starts from the same random stream). Its tasks may be a subset of the
    data's; ``model_options`` replaces the backbone options (e.g. a half-size encoder)."""
    wanted = set(grouping.tasks)
    tasks = [t for t in run.data.tasks if t.name in wanted]
    unknown = sorted(wanted - {t.name for t in tasks})
    if unknown:
        raise ValueError(f"grouping names unknown tasks {unknown}; dataset {run.data.name!r} has "
                         f"{run.data.task_names}")
    options = run.model.get("options") if model_options is None else model_options
    torch.manual_seed(run.seed)
    return build_branched_model(tasks, grouping.as_lists(), run.data.input_shape,
                                backbone=run.model.get("backbone"), backbone_options=options,
                                shared_blocks=int(run.model.get("shared_blocks", 0) or 0), serves=grouping.serves)


def loader_factory(data: TaskData, config: TrainConfig) -> Callable[..., DataLoader]:
    """``split, shuffle -> DataLoader`` for the training loop: ``train.batch_size`` is the global batch,
    sharded over the ranks under ``torchrun`` (evaluation reduces over them too), with
    ``train.loader_workers`` worker processes and pinned memory when training on CUDA."""
    ranks = Ranks.current()
    pin = resolve_device(config.device).type == "cuda"
    if ranks.active:
        check_batches(data, config.batch_size, ranks.world)

    def loader(split: str, shuffle: bool) -> DataLoader:
        return make_loader(getattr(data, split), config.batch_size, shuffle=shuffle,
                           num_workers=config.loader_workers, pin_memory=pin,
                           shard=(ranks.rank, ranks.world) if ranks.active else None)
    return loader


def fit(run: RunContext, model: nn.Module, *, tag: str, tasks: Sequence[Task] | None = None,
        config: TrainConfig | None = None, checkpoint_dir: Path | str | None = None, resume: bool = False,
        log: Callable[[dict[str, Any]], None] | None = None, score_test: bool = True,
        callbacks: Sequence[Callback] = (), predict: Predict | None = None, desc: str | None = None,
        **train_kw: Any) -> Fitted:
    """Train ``model`` with the run's loaders, balancer and diagnostics, then score it.

    Args:
        tag: the network's name (log records carry it as ``network``).
        tasks: the tasks it trains and is scored on (default: every task of the data).
        config: replaces ``run.train`` (e.g. another epoch count).
        checkpoint_dir, resume: per-epoch checkpoints and continuing from one.
        log: receives every epoch record (with ``network=tag``).
        score_test: also score the test split.
        desc: the progress bar's label (default ``tag``).
        callbacks, predict, train_kw: passed to :func:`~taskgrouping.engine.trainer.train`
            (``objective``, ``balancer`` replace the defaults).

    The validation metrics are those the trainer logged for the selected epoch (the returned weights).
    """
    tasks = list(run.data.tasks if tasks is None else tasks)
    config = config or run.train
    loader = loader_factory(run.data, config)
    train_loader = loader("train", shuffle=True)
    val_loader = loader("val", shuffle=False)
    if "balancer" not in train_kw:
        train_kw["balancer"] = get_balancer(run.balancer.get("name", "ew"), tasks=[t.name for t in tasks],
                                            **(run.balancer.get("options") or {}))
    callbacks = list(callbacks)
    every = int(run.diagnostics.get("every", 0) or 0)
    if every > 0 and len(tasks) > 1:  # GDS / GMS / FD every k steps (Mao et al.); need >= 2 tasks
        from taskgrouping.diagnostics import DiagnosticsCallback

        callbacks.append(DiagnosticsCallback(every=every, level=run.diagnostics.get("level", "feature")))

    def log_record(record: dict[str, Any]) -> None:
        if log is not None:
            log(dict(record, network=tag))

    result = train(model, train_loader, val_loader, tasks, config, seed=run.seed, checkpoint_dir=checkpoint_dir,
                   resume=resume, log=log_record, callbacks=callbacks, predict=predict, desc=desc or tag,
                   **train_kw)
    val = next(h["val"] for h in result.history if h["epoch"] == result.best_epoch)
    test = None
    if score_test:
        test_loader = loader("test", shuffle=False)
        test = evaluate(result.model, test_loader, tasks, predict)
    return Fitted(result, val, test)
