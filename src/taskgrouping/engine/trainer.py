"""One training loop for every network of every method.

A batch ``(x, {task: y})`` goes through an *objective* (the method's step: model forward and
per-task losses), then a *balancer* (losses -> gradients; equal weighting by default), then the
optimiser. After every epoch the model is scored on the validation split, the epoch is logged,
and a checkpoint (safetensors + JSON) is written so that a killed run resumes to the same numbers:
torch's global RNG is reseeded from ``(seed, epoch)`` at the start of every epoch, so data order,
dropout and Gumbel noise depend only on the epoch, not on the process history.

Under ``torchrun`` (:mod:`taskgrouping.engine.distributed`) every rank runs this loop on its slice of
the same global batches, in lockstep: rank 0's weights to start with, rank 0's RNG state at every
step, the losses turned into each rank's share with global values, the ranks' gradients added up
before the optimiser step, validation reduced over the ranks; rank 0 alone writes checkpoints (and
reads the one it resumes from, for every rank). The GPU path: bf16 autocast (``amp``),
``torch.compile`` of the trunks (``compile``), the copies of a backbone as one vmapped call
(``branches``), channels-last (``channels_last``), loader workers and
pinned memory (``loader_workers``; :func:`~taskgrouping.engine.fit.loader_factory`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from taskgrouping.balancing.base import Balancer
from taskgrouping.engine.checkpoint import Checkpoint, CheckpointError, error_line
from taskgrouping.engine.distributed import Ranks, task_shares
from taskgrouping.engine.evaluation import Predict, evaluate, total_loss
from taskgrouping.engine.hooks import Callback, Objective, TaskLossObjective
from taskgrouping.metrics import PRIMARY_METRICS, improves, selection_score
from taskgrouping.models.stacked import BRANCH_MODES, BranchMode, resolve_branch_mode
from taskgrouping.tasks import Task


class TrainingDiverged(RuntimeError):
    """A task's loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Optimisation settings (every key can be set from a config's ``train:`` section)."""

    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"  # none | step | plateau
    step_size: int = 15
    gamma: float = 0.5
    plateau_patience: int = 3
    early_stopping: int = 0  # patience in epochs on validation loss; 0 = off
    select: str = "best_val"  # best_val (restore the best validation epoch) | last
    select_metric: str = "loss"  # what "best" means: total val loss, or mean val error | auroc | average_precision
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the trunks (stem and branches; heads stay eager)
    channels_last: bool = False  # channels-last memory format for the network and 4-d inputs (CNNs on GPU)
    branches: str = "auto"  # auto | stacked | loop: copies of one backbone as one vmapped call (auto: on CUDA)
    loader_workers: int = 0  # DataLoader worker processes (pinned memory on CUDA)
    progress: bool = True
    tensorboard: bool = False
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        """Every field typed and ranged; a bad one is a ``ValueError`` naming ``train.<field>``."""
        import dataclasses
        import typing

        from taskgrouping.option_values import check_value

        hints = typing.get_type_hints(TrainConfig)
        positive, non_negative = {"low": 0, "low_open": True}, {"low": 0}
        rules: dict[str, dict[str, Any]] = {
            "epochs": {"low": 1}, "batch_size": {"low": 1}, "optimizer": {"choices": ("adam", "adamw", "sgd")},
            "lr": positive, "weight_decay": non_negative, "momentum": {"low": 0, "high": 1, "high_open": True},
            "schedule": {"choices": ("none", "step", "plateau")}, "step_size": {"low": 1},
            "gamma": dict(positive, **({"high": 1, "high_open": True} if self.schedule == "plateau" else {})),
            "plateau_patience": non_negative, "early_stopping": non_negative,
            "select": {"choices": ("best_val", "last")}, "device": {"choices": ("auto", "cpu", "cuda")},
            "select_metric": {"choices": PRIMARY_METRICS},
            "grad_clip": non_negative, "loader_workers": non_negative, "branches": {"choices": BRANCH_MODES},
        }
        for f in dataclasses.fields(self):
            check_value(f"train.{f.name}", getattr(self, f.name), hints[f.name], **rules.get(f.name, {}))
        if self.compile and self.branches == "stacked":
            raise ValueError("train.branches='stacked' cannot be combined with train.compile=true (torch.compile "
                             "compiles each branch on its own); use branches 'loop' or 'auto'")


@dataclass
class TrainResult:
    """The trained model (best validation epoch restored unless ``select='last'``) and its history."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    train_seconds: float
    epochs_run: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 7919) % (2**63 - 1)


def make_optimizer(config: TrainConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    # foreach: one fused update over all tensors (torch only defaults to it on CUDA); with many small
    # heads the per-tensor Python loop otherwise dominates a CPU step.
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               foreach=True)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.gamma,
                                                          patience=config.plateau_patience)
    return None


@dataclass
class _Progress:
    """The loop's running state (saved in every checkpoint)."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    best_weights: dict[str, Tensor]
    start_epoch: int = 0
    elapsed: float = 0.0


def train(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, tasks: Iterable[Task],
          config: TrainConfig | None = None, *, seed: int = 0, objective: Objective | None = None,
          balancer: Balancer | None = None, predict: Predict | None = None,
          checkpoint_dir: Path | str | None = None, resume: bool = False,
          log: Callable[[dict[str, Any]], None] | None = None, callbacks: Iterable[Callback] = (),
          desc: str = "train") -> TrainResult:
    """Train ``model`` on ``train_loader``, selecting the epoch on ``val_loader``.

    Args:
        model: any ``nn.Module``; a :class:`~taskgrouping.models.branched.BranchedModel` or a model
            returning ``{task: prediction}``.
        tasks: the tasks to train and score.
        config: optimisation settings.
        seed: base seed; epoch ``e`` starts by seeding torch with ``epoch_seed(seed, e)``.
        objective: the method's step (default :class:`~taskgrouping.engine.hooks.TaskLossObjective`).
        balancer: turns per-task losses into gradients (default equal weighting).
        predict: ``(model, x) -> {task: prediction}`` used for validation (default ``model(x)``).
        checkpoint_dir: where to write a checkpoint after every epoch (``None``: no checkpoints).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        log: called with one JSON-able record per epoch.
        callbacks: :class:`~taskgrouping.engine.hooks.Callback` observers (hooks and their
            contracts documented there).
    """
    config = config or TrainConfig()
    tasks = list(tasks)
    objective = objective or TaskLossObjective(tasks)
    callbacks = list(callbacks)
    balancer = balancer or Balancer()
    device = resolve_device(config.device)
    ranks = Ranks.current()
    if ranks.active:
        _check_sharded(train_loader, ranks)
    balancer.ranks = ranks
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    set_branch_mode(model, run_branch_mode(config, device))
    groups = objective.param_groups(model)
    # what the ranks add up after every step: the network's gradients and those of the objective's parameters
    # (a balancer's own parameters get the same gradient on every rank, from global values)
    synced = _unique([p for g in groups for p in g["params"]] + list(model.parameters()))
    extra = balancer.extra_parameters()
    if extra:
        with torch.no_grad():  # on the model's device before the optimiser (and a resumed one's state) sees them
            for p in extra:
                p.data = p.data.to(device)
        groups.append({"params": extra})
    optimizer = make_optimizer(config, groups)
    scheduler = make_scheduler(config, optimizer)
    shared_parameters = getattr(model, "shared_parameters", None)  # plain modules have none
    shared = shared_parameters() if shared_parameters is not None else []
    ckpt = Checkpoint(checkpoint_dir) if checkpoint_dir is not None and ranks.is_main else None  # rank 0 writes
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.amp
                else contextlib.nullcontext())

    run = _Progress([], {"val_loss": math.inf, "epoch": -1, "bad_epochs": 0},
                    {k: v.detach().clone() for k, v in model.state_dict().items()})
    found = _load_checkpoint(ckpt, ranks) if resume and checkpoint_dir is not None else None
    if found is not None:
        run = _restore(found, model, optimizer, scheduler, objective, balancer, callbacks, seed, config)
    ranks.broadcast_module(model)  # rank 0's weights everywhere (as DistributedDataParallel starts)
    if config.compile:
        compile_trunks(model)

    for cb in callbacks:
        cb.on_train_start(model, optimizer)
    writer = _tensorboard_writer(config, checkpoint_dir) if ranks.is_main else None
    # the objective may add epochs past config.epochs, one at a time (``extend``), e.g. while DMTG's S still learns
    planned = config.epochs + sum(1 for h in run.history if h.get("extend"))
    bar = _progress(itertools.count(run.start_epoch), desc, config.progress and ranks.is_main,
                    initial=run.start_epoch, total=planned)
    step = sum(h.get("steps", 0) for h in run.history)
    for epoch in bar:
        if epoch >= planned:
            break
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(seed, epoch))
        objective.on_epoch_start(epoch, model)
        model.train()
        train_losses, n_batches = _train_epoch(model, train_loader, objective, balancer, optimizer, callbacks,
                                               shared, config, device, autocast, epoch, step,
                                               _Sync(ranks, tasks, synced))
        step += n_batches
        ranks.broadcast_module(model, buffers_only=True)  # e.g. BatchNorm statistics: rank 0's everywhere
        balancer.on_epoch_end(epoch, train_losses)
        record: dict[str, Any] = {"epoch": epoch, "steps": n_batches, "lr": optimizer.param_groups[0]["lr"],
                                  "train_loss": train_losses}
        record.update(objective.on_epoch_end(epoch, model) or {})
        for cb in callbacks:
            record.update(cb.on_epoch_end(epoch) or {})
        val = evaluate(model, val_loader, tasks, predict, device)
        val_loss = total_loss(val)
        record["val"] = val
        record["val_total_loss"] = val_loss
        record.update(objective.after_validation(epoch, model, val) or {})
        if scheduler is not None:
            scheduler.step(val_loss) if config.schedule == "plateau" else scheduler.step()
        score = val_loss if config.select_metric == "loss" else selection_score(val, config.select_metric)
        best = run.best.get("score", run.best["val_loss"])  # checkpoints before select_metric keep val_loss only
        # an epoch the objective holds back (DMTG while S is fixed: not yet the model it returns) is selected only
        # until the first epoch it does not hold, and does not count towards early stopping
        held = record.get("selectable", True) is False
        if (config.select == "last" or run.best["epoch"] < 0 or (run.best.get("held", False) and not held)
                or improves(score, best)):
            run.best.update(val_loss=val_loss, score=score, epoch=epoch, bad_epochs=0, held=held)
            run.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif not held:
            run.best["bad_epochs"] += 1
        if record.get("rewind"):  # the objective continues from the best epoch so far (e.g. after DMTG's hold)
            model.load_state_dict(run.best_weights)
        if record.get("extend"):
            planned += 1
            if hasattr(bar, "total"):
                bar.total = planned
        record["seconds"] = time.perf_counter() - t0
        run.elapsed += record["seconds"]
        run.history.append(record)
        if log is not None:
            log(record)
        if writer is not None:
            _write_tensorboard(writer, record)
        stopped = bool(config.early_stopping and run.best["bad_epochs"] >= config.early_stopping) or bool(
            record.get("stop"))
        if ckpt is not None:
            ckpt.save(model, run.best_weights, optimizer, checkpoint_state(
                epoch if not stopped else planned - 1, run.history, run.best, run.elapsed, scheduler, objective,
                balancer, seed, config, callbacks))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(train=f"{sum(train_losses.values()):.4f}", val=f"{val_loss:.4f}")
        if stopped:
            break
    if writer is not None:
        writer.close()
    if config.select == "best_val":
        model.load_state_dict(run.best_weights)
    return TrainResult(model, run.history, run.best["epoch"], run.elapsed, len(run.history))


def checkpoint_state(epoch: int, history: list[dict[str, Any]], best: dict[str, Any], elapsed: float,
                     scheduler: Any, objective: Objective, balancer: Balancer, seed: int, config: TrainConfig,
                     callbacks: Sequence[Callback]) -> dict[str, Any]:
    """What a checkpoint keeps besides the tensors, as :func:`_restore` reads it back (``epoch``: the last
    one done, ``train.epochs - 1`` once training has ended)."""
    return {"epoch": epoch, "history": history, "best": best, "elapsed": elapsed,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "objective": objective.state_dict(), "balancer": balancer.state_dict(), "seed": seed,
            "config": asdict(config), "callbacks": [cb.state_dict() for cb in callbacks]}


def _train_epoch(model: nn.Module, loader: DataLoader, objective: Objective, balancer: Balancer,
                 optimizer: torch.optim.Optimizer, callbacks: Sequence[Callback], shared: list[Tensor],
                 config: TrainConfig, device: torch.device, autocast: Any, epoch: int,
                 step: int, sync: "_Sync | None" = None) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (mean train loss per task over the batches that label it,
    number of batches). Under
    ``torchrun`` (``sync``) the losses become this rank's shares with global values and the ranks'
    gradients are added up before the optimiser step (:mod:`taskgrouping.engine.distributed`)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    n_batches = 0
    ranks = sync.ranks if sync is not None else Ranks()
    for x, targets in loader:
        x = x.to(device, non_blocking=True)
        if config.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        for cb in callbacks:
            cb.on_batch_start(step, model, (x, targets))
        ranks.sync_rng(device)
        with autocast, sdpa_kernel(SDPBackend.MATH) if balancer.double_backward else contextlib.nullcontext():
            out = objective(model, x, targets)
        if ranks.active:
            out.losses = task_shares(ranks, sync.tasks, out.losses, targets)
        # every task's loss read in one transfer (one synchronisation a step on a GPU, not two per task)
        values = dict(zip(out.losses, torch.stack([v.detach().double().reshape(()) for v in out.losses.values()])
                          .tolist())) if out.losses else {}
        for name, value in values.items():
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss of task {name!r} became {value} at epoch {epoch}, "
                                       f"step {step}; lower train.lr or check the task's targets")
        for cb in callbacks:
            cb.on_step(step, out, model, (x, targets))
        optimizer.zero_grad(set_to_none=True)
        if out.extra_loss is not None:  # a regulariser of the parameters: each rank adds 1/P of it
            (out.extra_loss / ranks.world if ranks.active else out.extra_loss).backward(retain_graph=True)
        balancer.backward(out.losses, shared, list(out.features.values()) or None)
        if ranks.active:
            ranks.sum_grads(sync.params)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        objective.after_step()
        for name, loss in out.losses.items():
            value = values[name]
            sums[name] = sums.get(name, 0.0) + value
            # a task without a label in the batch has a constant zero loss (TaskLossObjective): not counted
            counts[name] = counts.get(name, 0) + int(loss.requires_grad or value != 0.0)
        n_batches += 1
        step += 1
    return {k: v / max(counts[k], 1) for k, v in sums.items()}, n_batches


@dataclass
class _Sync:
    """What the ranks of a distributed training share every step: the trained tasks and the
    parameters whose gradients they add up."""

    ranks: Ranks
    tasks: list[Task]
    params: list[Tensor]


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def _check_sharded(loader: DataLoader, ranks: Ranks) -> None:
    """Under torchrun the training loader must give each rank its slice of the global batches."""
    from taskgrouping.data.base import loader_shard

    if loader_shard(loader) != (ranks.rank, ranks.world):
        raise ValueError(f"torch.distributed runs {ranks.world} ranks, but the training loader is not sharded for "
                         f"them; build it with make_loader(..., shard=(rank, world)) as engine.fit does")


def run_branch_mode(config: TrainConfig, device: torch.device) -> BranchMode:
    """How a run trains (and scores) the copies of a backbone: ``train.branches`` resolved for ``device``;
    the loop under ``train.compile`` (which compiles each branch on its own)."""
    return "loop" if config.compile else resolve_branch_mode(config.branches, device)


def set_branch_mode(model: nn.Module, mode: BranchMode) -> None:
    """Run the copies of a backbone inside ``model`` (branches, InterroGate's streams) stacked or in a loop."""
    for module in model.modules():
        if hasattr(module, "branch_mode"):
            module.branch_mode = mode


def compile_trunks(model: nn.Module) -> None:
    """``torch.compile`` (in place: the state dict keeps its keys) every branched network's stem and
    branches, where the cost of a step lies; heads stay eager (one small graph each would cost more
    to compile than it saves). A model without branches is compiled whole."""
    from taskgrouping.models.branched import BranchedModel

    trunks = [m for b in model.modules() if isinstance(b, BranchedModel) for m in (b.stem, *b.branches)]
    for module in trunks or [model]:
        # torch's in-place compile even where a model defines its own ``compile`` (InterroGate's pruning)
        nn.Module.compile(module)


# settings a checkpoint must share with the run that continues it (the epoch count may grow)
_RESUME_KEYS = ("batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule", "step_size", "gamma",
                "plateau_patience", "select", "select_metric", "grad_clip")


def _load_checkpoint(ckpt: Checkpoint | None, ranks: Ranks) -> tuple[Any, str] | None:
    """Rank 0 reads its checkpoint (``None``: there is none) and every rank gets it, with the folder
    it came from; a damaged one is the same :class:`CheckpointError` on every rank."""
    found = error = None
    if ckpt is not None and ckpt.exists:
        try:
            found = (ckpt.load(), str(ckpt.dir))
        except CheckpointError as exc:
            if not ranks.active:
                raise
            error = str(exc)
    found, error = ranks.broadcast_object((found, error))
    if error is not None:
        raise CheckpointError(error)
    return found


def _restore(found: tuple[Any, str], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             objective: Objective, balancer: Balancer, callbacks: Sequence[Callback], seed: int,
             config: TrainConfig) -> _Progress:
    """Load a checkpoint (:func:`_load_checkpoint`) into the model, optimiser, scheduler, objective,
    balancer and callbacks."""
    (weights, best_weights, opt_state, state), directory = found
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    mine = asdict(config)
    differ = [f"seed {state.get('seed')!r} (now {seed!r})"] if state.get("seed", seed) != seed else []
    differ += [f"train.{k}={saved[k]!r} (now {mine[k]!r})" for k in _RESUME_KEYS if k in saved and saved[k] != mine[k]]
    if differ:
        raise CheckpointError(f"checkpoint in {directory} was written with {', '.join(differ)}; resume with the "
                              f"same settings or delete {directory} to train this network again from its first epoch")
    try:
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("objective") is not None:
            objective.load_state_dict(state["objective"])
        if state.get("balancer") is not None:
            balancer.load_state_dict(state["balancer"])
        for cb, cb_state in zip(callbacks, state.get("callbacks") or []):
            if cb_state is not None:
                cb.load_state_dict(cb_state)
        return _Progress(list(state["history"]), dict(state["best"]), best_weights, int(state["epoch"]) + 1,
                         float(state.get("elapsed", 0.0)))
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint in {directory} does not fit this model/optimiser ({error_line(exc)}); "
                              f"delete {directory} to train this network again from its first epoch") from None


def _progress(it: Iterable, desc: str, enabled: bool, **kw: Any) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, disable=not sys.stderr.isatty() and "TQDM_FORCE" not in os.environ,
                unit="epoch", **kw)


def _tensorboard_writer(config: TrainConfig, directory: Path | str | None):
    if not config.tensorboard or directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("train.tensorboard=true needs the tensorboard package: pip install 'taskgrouping[tensorboard]'"
                         ) from None
    return SummaryWriter(log_dir=str(Path(directory) / "tensorboard"))


def _write_tensorboard(writer, record: dict[str, Any]) -> None:
    e = record["epoch"]
    writer.add_scalar("val/total_loss", record["val_total_loss"], e)
    writer.add_scalar("lr", record["lr"], e)
    for t, v in record["train_loss"].items():
        writer.add_scalar(f"train_loss/{t}", v, e)
    for t, ms in record["val"].items():
        for m, v in ms.items():
            writer.add_scalar(f"val/{t}/{m}", v, e)
