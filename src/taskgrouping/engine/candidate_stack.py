"""Candidate networks of a two-shot method trained together, as one network, in one process.

Standley's selection, HOA, ESA and MTG-Net train many task-subset networks of one architecture. The
``stacked`` fan-out backend (:func:`~taskgrouping.engine.jobs.run_jobs`) joins such networks into one
:class:`CandidateStack`: each candidate keeps its own modules (built and initialised exactly as it would
be alone), its trunk becomes one branch of a :class:`~taskgrouping.models.branched.BranchedModel` and its
heads that branch's heads, so ``train.branches`` runs the trunks as one vmapped call (stacked) or one
after another (loop). The stack is trained by the one trainer on the sum of every candidate's task losses;
the candidates share no parameter, so each gets exactly its own gradient, and Adam's update is elementwise.
Selection and early stopping are per candidate (:class:`_PerCandidateSelection`: each keeps the weights of
its own best validation epoch; one that has run out of patience trains no more, and the stack ends when
every candidate has stopped). In loop mode, without dropout, each candidate's losses, weights and metrics are
bit for bit those of training it alone (tested); stacked, equal to float rounding.

What would couple the candidates is refused (:func:`stack_refusal`): a balancer other than equal weighting,
gradient clipping (a global norm), the plateau schedule (one validation loss), diagnostics, torchrun.
A stack writes no per-epoch checkpoint; once it is done, every candidate with a checkpoint directory gets
the checkpoint its own training would have ended with (weights, best weights, its optimiser and scheduler
state when it stopped, history), so ESA's continuation (``init_from``) and the job cache work as for a
network trained alone. A killed stack is trained again; a job whose checkpoint exists trains (resumes)
alone. Each candidate's ``train_seconds`` is its share (1/K) of the stack's time in the epochs it ran.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.balancing.base import get_balancer
from taskgrouping.engine.checkpoint import Checkpoint
from taskgrouping.engine.distributed import Ranks
from taskgrouping.engine.evaluation import evaluate, total_loss
from taskgrouping.engine.fit import RunContext, loader_factory
from taskgrouping.engine.hooks import CallbackBase, TaskLossObjective
from taskgrouping.engine.trainer import TrainConfig, checkpoint_state, make_optimizer, make_scheduler, train
from taskgrouping.engine.jobs import JobResult, assemble_networks, build_network
from taskgrouping.io import tensor_bytes
from taskgrouping.metrics import improves, selection_score
from taskgrouping.models.branched import BranchedModel

__all__ = ["CandidateStack", "stack_refusal", "stack_groups", "train_stack"]


def _key(k: int, task: str) -> str:
    return f"{k}/{task}"


class CandidateStack(nn.Module):
    """One-branch candidate networks as one module: ``forward(x)`` gives ``{"k/task": prediction}`` for
    every head of every candidate ``k`` still ``active`` (one that has stopped runs no more),
    :meth:`all_predictions` for every candidate. The candidates' modules are shared, not copied (and
    registered once, through ``joined``): training the stack trains ``networks[k]``."""

    def __init__(self, networks: Sequence[BranchedModel]) -> None:
        super().__init__()
        self.networks = list(networks)
        self.active = [True] * len(networks)
        serves: dict[str, int] = {}
        for k, net in enumerate(networks):
            for t in net.groups[0]:
                serves.setdefault(t, k)
        self.joined = assemble_networks(networks, serves)  # branch k: candidate k's stem and branch, its heads

    def _predictions(self, x: Tensor, candidates: Sequence[int]) -> dict[str, Tensor]:
        preds, _ = self.joined.forward_heads(x, [(k, t) for k in candidates for t in self.networks[k].groups[0]])
        return {_key(k, t): p for (k, t), p in preds.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._predictions(x, [k for k, on in enumerate(self.active) if on])

    def all_predictions(self, x: Tensor) -> dict[str, Tensor]:
        return self._predictions(x, range(len(self.networks)))


class _RenamedTargets:
    """A loader whose batches carry each task's targets under every stacked name of the task (``k/task``);
    the sampler is the wrapped loader's (sharding checks read it)."""

    def __init__(self, loader: Any, names: dict[str, list[str]]) -> None:
        self.loader, self.names = loader, names
        self.batch_sampler, self.sampler = loader.batch_sampler, loader.sampler

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        for x, targets in self.loader:
            yield x, {new: targets[old] for old, news in self.names.items() for new in news}

    def __len__(self) -> int:
        return len(self.loader)


class _OptimizerRef(CallbackBase):
    """Hands the stack's optimiser to :class:`_PerCandidateSelection` (the trainer makes it)."""

    optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


class _PerCandidateSelection(TaskLossObjective):
    """The stack's objective: every candidate's task losses (keys ``k/task``), and after each validation
    every candidate's own selection and patience, as the trainer keeps them for a network alone. A candidate
    out of patience leaves the stack's training (``stack.active``), so its weights and optimiser state stay
    as they were when it stopped, for the checkpoint its own training would end with."""

    def __init__(self, stack: CandidateStack, tasks: Sequence[Any], config: TrainConfig) -> None:
        super().__init__(tasks)
        self.stack, self.select, self.metric = stack, config.select, config.select_metric
        self.patience = int(config.early_stopping or 0)
        self.optimizer_ref = _OptimizerRef()
        n = len(stack.networks)
        self.best: list[dict[str, Any]] = [{"epoch": -1, "score": math.inf, "bad": 0} for _ in range(n)]
        self.weights: list[dict[str, Tensor] | None] = [None] * n
        self.stopped_at: list[int | None] = [None] * n

    def after_validation(self, epoch: int, model: nn.Module, val: dict[str, dict[str, float]]) -> dict[str, Any]:
        for k, net in enumerate(self.stack.networks):
            if self.stopped_at[k] is not None:
                continue
            mine = {t: val[_key(k, t)] for t in net.groups[0]}
            score = selection_score(mine, self.metric)
            best = self.best[k]
            if self.select == "last" or best["epoch"] < 0 or improves(score, best["score"]):
                best.update(epoch=epoch, score=score, val_loss=total_loss(mine), bad=0)
                self.weights[k] = {n: v.detach().clone() for n, v in net.state_dict().items()}
            else:
                best["bad"] += 1
            if self.patience and best["bad"] >= self.patience:
                self.stopped_at[k] = epoch
                self.stack.active[k] = False  # trains no more: no forward or backward pass, no optimiser step
                for t in net.groups[0]:
                    del self.tasks[_key(k, t)]
        return {"stop": all(s is not None for s in self.stopped_at)}


def stack_refusal(run: RunContext) -> str | None:
    """Why this run's settings would couple the candidates of a stack (``None``: they do not)."""
    t = run.train
    balancer = run.balancer.get("name", "ew") if run.balancer else "ew"
    if balancer != "ew":
        return f"balancer {balancer!r} weighs the candidates' losses together; it needs balancer 'ew'"
    if t.grad_clip > 0:
        return f"train.grad_clip={t.grad_clip} clips one norm over every candidate; it needs train.grad_clip 0"
    if t.schedule == "plateau":
        return "train.schedule 'plateau' steps on one validation loss; it needs schedule none or step"
    if int(run.diagnostics.get("every", 0) or 0) > 0:
        return "diagnostics measure the tasks of one network; it needs diagnostics.every 0"
    if Ranks.current().active:
        return "it trains in one process, not under torchrun"
    return None


def stack_groups(jobs: Sequence[Any]) -> list[list[int]]:
    """Indices of ``jobs`` that train together: same backbone options and epoch count, one group each.
    A job continuing an earlier run (``init_from``) or whose checkpoint exists (a resume) trains alone."""
    groups: dict[str, list[int]] = {}
    alone: list[list[int]] = []
    for i, job in enumerate(jobs):
        if (job.init_from is not None or len(job.grouping.as_lists()) != 1
                or (job.checkpoint_dir is not None and Checkpoint(job.checkpoint_dir).exists)):
            alone.append([i])
            continue
        key = json.dumps([job.model_options, job.epochs], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return sorted(list(groups.values()) + alone)


def train_stack(run: RunContext, jobs: Sequence[Any]) -> list[Any]:
    """Train ``jobs`` (one :func:`stack_groups` group) as one :class:`CandidateStack`; one
    :class:`~taskgrouping.engine.jobs.JobResult` per job, in order."""
    networks = [build_network(run, job) for job in jobs]
    stack = CandidateStack(networks)
    data_tasks = {t.name: t for t in run.data.tasks}
    names: dict[str, list[str]] = {}
    stacked_tasks = []
    for k, net in enumerate(networks):
        for t in net.groups[0]:
            names.setdefault(t, []).append(_key(k, t))
            stacked_tasks.append(replace(data_tasks[t], name=_key(k, t)))
    alone = run.train if jobs[0].epochs is None else replace(run.train, epochs=int(jobs[0].epochs))
    objective = _PerCandidateSelection(stack, stacked_tasks, alone)
    loader = loader_factory(run.data, alone)
    result = train(stack, _RenamedTargets(loader("train", shuffle=True), names),
                   _RenamedTargets(loader("val", shuffle=False), names), stacked_tasks,
                   replace(alone, select="last", early_stopping=0), seed=run.seed, objective=objective,
                   balancer=get_balancer("ew", tasks=[t.name for t in stacked_tasks]),
                   predict=lambda model, x: model.all_predictions(x),  # every candidate scored every epoch
                   callbacks=[objective.optimizer_ref], desc=f"stack of {len(jobs)}")
    test_loader = loader("test", shuffle=False)
    out = []
    for k, (job, net) in enumerate(zip(jobs, networks)):
        stopped = objective.stopped_at[k]
        last = stopped if stopped is not None else result.history[-1]["epoch"]
        history = [_own_record(h, k, net.groups[0], len(jobs)) for h in result.history if h["epoch"] <= last]
        if job.checkpoint_dir is not None:  # net holds its weights as they were when it stopped
            _save_checkpoint(run, job.checkpoint_dir, net, objective, k, alone, history)
        if alone.select == "best_val":
            net.load_state_dict(objective.weights[k])
        best = objective.best[k]["epoch"]
        val = next(h["val"] for h in history if h["epoch"] == best)
        test = evaluate(net, test_loader, [data_tasks[t] for t in net.groups[0]])
        out.append(JobResult(job.tag, val, test, float(sum(h["seconds"] for h in history)), best, len(history),
                             history, tensor_bytes(net.state_dict())))
    return out


def _save_checkpoint(run: RunContext, directory: str, net: BranchedModel, objective: _PerCandidateSelection,
                     k: int, config: TrainConfig, history: list[dict[str, Any]]) -> None:
    """The checkpoint candidate ``k``'s own training would have ended with (the trainer's last save): its
    weights and optimiser state as they were when it stopped (it has not trained since), its best weights,
    the scheduler replayed to that epoch, its history and best epoch."""
    best, stack_optimizer = objective.best[k], objective.optimizer_ref.optimizer
    assert objective.weights[k] is not None and stack_optimizer is not None
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, [{"params": params}])
    for p in params:
        if p in stack_optimizer.state:  # a parameter that never had a gradient has no optimiser state alone either
            optimizer.state[p] = stack_optimizer.state[p]
    scheduler = make_scheduler(config, optimizer)
    if scheduler is not None:
        with warnings.catch_warnings():  # replayed without optimiser steps, which torch warns about
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(len(history)):  # the trainer steps it once an epoch (plateau is refused)
                scheduler.step()
    Checkpoint(directory).save(net, objective.weights[k], optimizer, checkpoint_state(
        config.epochs - 1, history, {"val_loss": best["val_loss"], "score": best["score"], "epoch": best["epoch"],
                                     "bad_epochs": best["bad"], "held": False},
        float(sum(h["seconds"] for h in history)), scheduler, TaskLossObjective([]),
        get_balancer("ew", tasks=list(net.groups[0])), run.seed, config, []))


def _own_record(record: dict[str, Any], k: int, tasks: Sequence[str], n: int) -> dict[str, Any]:
    """Candidate ``k``'s part of a stack's epoch record (its tasks under their own names, 1/n of the time)."""
    own = copy.copy(record)
    own["train_loss"] = {t: record["train_loss"][_key(k, t)] for t in tasks if _key(k, t) in record["train_loss"]}
    own["val"] = {t: record["val"][_key(k, t)] for t in tasks}
    own["val_total_loss"] = total_loss(own["val"])
    own["seconds"] = record["seconds"] / n
    own.pop("stop", None)
    return own
