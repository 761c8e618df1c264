"""One training loop for every method.

A batch ``(x, {task: y})`` goes through an *objective* (the method's step: model forward and
per-task losses), then a *balancer* (losses -> gradients; equal weighting by default), then the
optimiser. After every epoch the model is scored on the validation split, the epoch is logged,
and a checkpoint (safetensors + JSON) is written so that a killed run resumes to the same numbers:
torch's global RNG is reseeded from ``(seed, epoch)`` at the start of every epoch, so data order,
dropout and Gumbel noise depend only on the epoch, not on the process history.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from taskgrouping.balancing.base import Balancer
from taskgrouping.tasks import Task


class TrainingDiverged(RuntimeError):
    """A task's loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


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


class Objective(Protocol):
    """A method's training step. Optional hooks: ``param_groups(model)`` (what the main optimiser
    updates, default every parameter), ``after_step()`` (e.g. step a method's own optimiser, which
    must also zero its parameters' grads), ``on_epoch_start(epoch, model)``, ``on_epoch_end(epoch,
    model) -> dict`` (merged into the epoch's log record), ``state_dict()``, ``load_state_dict()``
    (JSON-able; saved in checkpoints)."""

    def __call__(self, model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> StepOutput: ...


class TaskLossObjective:
    """Each task's loss from every head that trains it (a branched model's ``groups``), or from the
    plain ``{task: prediction}`` dict returned by any other model."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        self.tasks = {t.name: t for t in tasks}

    def __call__(self, model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        if hasattr(model, "forward_heads"):
            preds, feats = model.forward_heads(x)
            losses: dict[str, Tensor] = {}
            for (k, t), p in preds.items():
                loss = self.tasks[t].loss(p, targets[t])
                losses[t] = losses[t] + loss if t in losses else loss
            return StepOutput(losses, feats)
        preds = model(x)
        return StepOutput({t: self.tasks[t].loss(preds[t], targets[t]) for t in self.tasks})


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
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    progress: bool = True
    tensorboard: bool = False
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "optimizer": self.optimizer in ("adam", "adamw", "sgd"),
            "schedule": self.schedule in ("none", "step", "plateau"), "select": self.select in ("best_val", "last"),
            "device": self.device in ("auto", "cpu", "cuda"), "early_stopping": self.early_stopping >= 0,
            "step_size": self.step_size >= 1, "gamma": self.gamma > 0, "grad_clip": self.grad_clip >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid train.{bad[0]}={getattr(self, bad[0])!r}")


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (never a half-written file)."""
    _atomic_write_bytes(Path(path), text.encode())


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpoint:
    """Files of one training run's checkpoint directory; ``state.json`` is written last (commit)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    @property
    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, model: nn.Module, best: dict[str, Tensor], optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _save_tensors(self.dir / "model.safetensors", model.state_dict())
        _save_tensors(self.dir / "best.safetensors", best)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        _save_tensors(self.dir / "optimizer.safetensors", opt_tensors)
        state = dict(state, optimizer=opt_meta)
        atomic_write_text(self.dir / "state.json", json.dumps(state, indent=1, default=_json_default))

    def load(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        """(model tensors, best tensors, optimizer state_dict, trainer state); CheckpointError if unreadable."""
        try:
            state = json.loads((self.dir / "state.json").read_text())
            model = load_file(str(self.dir / "model.safetensors"))
            best = load_file(str(self.dir / "best.safetensors"))
            opt = _unflatten_optimizer(load_file(str(self.dir / "optimizer.safetensors")), state.pop("optimizer"))
        except Exception as exc:  # any corruption is reported the same way, naming the directory
            raise CheckpointError(f"checkpoint in {self.dir} is unreadable ({type(exc).__name__}: {exc}); "
                                  "delete it or start without --resume") from None
        return model, best, opt, state


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


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


def train(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, tasks: Iterable[Task],
          config: TrainConfig | None = None, *, seed: int = 0, objective: Objective | None = None,
          balancer: Balancer | None = None, predict: Callable[[nn.Module, Tensor], dict[str, Tensor]] | None = None,
          checkpoint_dir: Path | str | None = None, resume: bool = False,
          log: Callable[[dict[str, Any]], None] | None = None, callbacks: Iterable[Any] = (),
          desc: str = "train") -> TrainResult:
    """Train ``model`` on ``train_loader``, selecting the epoch on ``val_loader``.

    Args:
        model: any ``nn.Module``; a :class:`~taskgrouping.models.branched.BranchedModel` or a model
            returning ``{task: prediction}``.
        tasks: the tasks to train and score.
        config: optimisation settings.
        seed: base seed; epoch ``e`` starts by seeding torch with ``epoch_seed(seed, e)``.
        objective: the method's step (default :class:`TaskLossObjective`).
        balancer: turns per-task losses into gradients (default equal weighting).
        predict: ``(model, x) -> {task: prediction}`` used for validation (default ``model(x)``).
        checkpoint_dir: where to write a checkpoint after every epoch (``None``: no checkpoints).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        log: called with one JSON-able record per epoch.
        callbacks: objects with optional hooks ``on_train_start(model, optimizer)`` (once, after a
            resume is restored), ``on_batch_start(step, model, batch)`` (before the
            forward pass; may change parameters temporarily, e.g. TAG's lookahead, if it restores
            them) and ``on_step(step, output, model, batch)`` (after the forward pass, graph alive,
            before the backward pass; must not touch ``.grad``: use ``torch.autograd.grad`` with
            ``retain_graph=True``, e.g. diagnostics), ``on_epoch_end(epoch) -> dict`` (merged into the
            epoch's log record) and ``state_dict()`` / ``load_state_dict()`` (saved in checkpoints).
    """
    config = config or TrainConfig()
    tasks = list(tasks)
    objective = objective or TaskLossObjective(tasks)
    callbacks = list(callbacks)
    balancer = balancer or Balancer()
    device = resolve_device(config.device)
    model.to(device)
    groups = objective.param_groups(model) if hasattr(objective, "param_groups") else [
        {"params": [p for p in model.parameters() if p.requires_grad]}]
    extra = balancer.extra_parameters()
    if extra:
        groups.append({"params": extra})
    optimizer = make_optimizer(config, groups)
    scheduler = make_scheduler(config, optimizer)
    shared = model.shared_parameters() if hasattr(model, "shared_parameters") else []
    ckpt = Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.amp
                else contextlib.nullcontext())

    history: list[dict[str, Any]] = []
    best = {"val_loss": math.inf, "epoch": -1, "bad_epochs": 0}
    elapsed = 0.0
    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_epoch = 0
    if ckpt is not None and resume and ckpt.exists:
        weights, best_weights, opt_state, state = ckpt.load()
        try:
            model.load_state_dict(weights)
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint in {ckpt.dir} does not fit this model/optimiser: {exc}") from None
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        for obj, key in ((objective, "objective"), (balancer, "balancer")):
            if hasattr(obj, "load_state_dict") and state.get(key) is not None:
                obj.load_state_dict(state[key])
        for cb, cb_state in zip(callbacks, state.get("callbacks") or []):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        elapsed = float(state.get("elapsed", 0.0))

    for cb in callbacks:
        if hasattr(cb, "on_train_start"):
            cb.on_train_start(model, optimizer)
    writer = _tensorboard_writer(config, checkpoint_dir)
    bar = _progress(range(start_epoch, config.epochs), desc, config.progress, initial=start_epoch,
                    total=config.epochs)
    step = sum(h.get("steps", 0) for h in history)
    stopped = False
    for epoch in bar:
        if stopped:
            break
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(seed, epoch))
        if hasattr(objective, "on_epoch_start"):
            objective.on_epoch_start(epoch, model)
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        for x, targets in train_loader:
            x = x.to(device, non_blocking=True)
            targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
            for cb in callbacks:
                if hasattr(cb, "on_batch_start"):
                    cb.on_batch_start(step, model, (x, targets))
            with autocast:
                out = objective(model, x, targets)
            for name, loss in out.losses.items():
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss of task {name!r} became {float(loss.detach())} at epoch {epoch}, "
                                           f"step {step}; lower train.lr or check the task's targets")
            for cb in callbacks:
                if hasattr(cb, "on_step"):
                    cb.on_step(step, out, model, (x, targets))
            optimizer.zero_grad(set_to_none=True)
            if out.extra_loss is not None:
                out.extra_loss.backward(retain_graph=True)
            balancer.backward(out.losses, shared, list(out.features.values()) or None)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if hasattr(objective, "after_step"):
                objective.after_step()
            for name, loss in out.losses.items():
                sums[name] = sums.get(name, 0.0) + float(loss.detach())
            n_batches += 1
            step += 1
        train_losses = {k: v / max(n_batches, 1) for k, v in sums.items()}
        balancer.on_epoch_end(epoch, train_losses)
        record: dict[str, Any] = {"epoch": epoch, "steps": n_batches, "lr": optimizer.param_groups[0]["lr"],
                                  "train_loss": train_losses}
        if hasattr(objective, "on_epoch_end"):
            record.update(objective.on_epoch_end(epoch, model) or {})
        for cb in callbacks:
            if hasattr(cb, "on_epoch_end"):
                record.update(cb.on_epoch_end(epoch) or {})
        val = evaluate(model, val_loader, tasks, predict, device)
        val_loss = total_loss(val)
        record["val"] = val
        record["val_total_loss"] = val_loss
        if scheduler is not None:
            scheduler.step(val_loss) if config.schedule == "plateau" else scheduler.step()
        if val_loss < best["val_loss"] or config.select == "last":
            best.update(val_loss=val_loss, epoch=epoch, bad_epochs=0)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best["bad_epochs"] += 1
        record["seconds"] = time.perf_counter() - t0
        elapsed += record["seconds"]
        history.append(record)
        if log is not None:
            log(record)
        if writer is not None:
            _write_tensorboard(writer, record)
        if config.early_stopping and best["bad_epochs"] >= config.early_stopping:
            stopped = True
        if ckpt is not None:
            ckpt.save(model, best_weights, optimizer, {
                "epoch": epoch if not stopped else config.epochs - 1, "history": history, "best": best, "elapsed": elapsed,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "objective": objective.state_dict() if hasattr(objective, "state_dict") else None,
                "balancer": balancer.state_dict(), "seed": seed, "config": asdict(config),
                "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks]})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(train=f"{sum(train_losses.values()):.4f}", val=f"{val_loss:.4f}")
    if writer is not None:
        writer.close()
    if config.select == "best_val":
        model.load_state_dict(best_weights)
    return TrainResult(model, history, best["epoch"], elapsed, len(history))


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
