"""Methods that train a *given* grouping: naive MTL (one group), single-task learning (N groups),
the dataset's known grouping (``oracle``), a user's grouping (``fixed``) and random groupings.

All of them are "K branches with a given assignment": :func:`fit_grouping` builds the branched
model, trains it with the shared trainer and scores it on the test split.
"""

from __future__ import annotations

import torch
from torch import nn

from taskgrouping.balancing.base import get_balancer
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.models.branched import BranchedModel, build_branched_model
from taskgrouping.trainer import TrainResult, evaluate, train


def build_model(ctx: MethodContext, grouping: Grouping) -> BranchedModel:
    """A freshly initialised branched model for ``grouping`` (torch seeded with the run seed first,
    so every method starts from the same random stream)."""
    torch.manual_seed(ctx.seed)
    return build_branched_model(ctx.data.tasks, grouping.as_lists(), ctx.data.input_shape,
                                backbone=ctx.model.get("backbone"), backbone_options=ctx.model.get("options"),
                                shared_blocks=int(ctx.model.get("shared_blocks", 0)), serves=grouping.serves)


def fit_model(ctx: MethodContext, model: nn.Module, tag: str, score_test: bool = True,
              **train_kw) -> tuple[TrainResult, dict, dict | None]:
    """Train ``model`` (checkpoints under ``tag``) and return (train result, val metrics, test metrics).

    The validation metrics are those the trainer logged for the selected epoch (the returned
    weights); the test split is scored only when ``score_test`` (``None`` otherwise).
    """
    train_loader, val_loader, test_loader = ctx.loaders()
    balancer = get_balancer(ctx.balancer.get("name", "ew"), tasks=ctx.data.task_names,
                            **(ctx.balancer.get("options") or {}))

    def log(record: dict) -> None:
        ctx.log(dict(record, network=tag))

    every = int(ctx.diagnostics.get("every", 0) or 0)
    if every > 0:  # GDS / GMS / FD every k steps, logged with each epoch (Mao et al.)
        from taskgrouping.diagnostics import DiagnosticsCallback

        train_kw["callbacks"] = list(train_kw.get("callbacks", ())) + [
            DiagnosticsCallback(every=every, level=ctx.diagnostics.get("level", "feature"))]

    result = train(model, train_loader, val_loader, ctx.data.tasks, ctx.train, seed=ctx.seed, balancer=balancer,
                   checkpoint_dir=ctx.checkpoint_dir(tag), resume=ctx.resume, log=log, desc=f"{ctx.name}:{tag}",
                   **train_kw)
    val = next(h["val"] for h in result.history if h["epoch"] == result.best_epoch)
    test = (evaluate(result.model, test_loader, ctx.data.tasks, train_kw.get("predict"),
                     next(result.model.parameters()).device) if score_test else None)
    return result, val, test


def fit_grouping(ctx: MethodContext, grouping: Grouping, tag: str, init: str = "scratch") -> MethodResult:
    """Train ``grouping`` from scratch or from the naive-MTL weights (``init="naive_mtl"``)."""
    if init not in ("scratch", "naive_mtl"):
        raise ValueError(f"{ctx.name}.init must be 'scratch' or 'naive_mtl', got {init!r}")
    model = build_model(ctx, grouping)
    if init == "naive_mtl":
        model.load_from_single_branch(naive_mtl_model(ctx))
    result, val, test = fit_model(ctx, model, tag)
    return MethodResult(grouping, result.model, test, val, result.train_seconds, n_networks=1,
                        extra={"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "init": init})


def naive_mtl_model(ctx: MethodContext) -> BranchedModel:
    """The run's trained naive-MTL model (trained now, under ``warm_start/``, if no method has yet)."""
    if "naive_mtl_model" not in ctx.cache:
        res = fit_grouping(ctx, Grouping.partition([ctx.data.task_names]), "warm_start_naive_mtl")
        ctx.cache["naive_mtl_model"] = res.model
        ctx.cache["naive_mtl_seconds"] = res.train_seconds
    return ctx.cache["naive_mtl_model"]


@register_method("naive_mtl")
def naive_mtl(ctx: MethodContext) -> MethodResult:
    """All tasks share one network (one branch, N heads)."""
    res = fit_grouping(ctx, Grouping.partition([ctx.data.task_names], method="naive_mtl"), "naive_mtl")
    if "naive_mtl_model" not in ctx.cache:
        ctx.cache.update(naive_mtl_model=res.model, naive_mtl_seconds=res.train_seconds)
    return res


@register_method("single_task")
def single_task(ctx: MethodContext) -> MethodResult:
    """One network per task (N branches trained side by side; disjoint parameters, so identical to
    N separate runs on the same batches)."""
    res = fit_grouping(ctx, Grouping.partition([[t] for t in ctx.data.task_names], method="single_task"),
                       "single_task")
    res.n_networks = len(ctx.data.tasks)
    ctx.cache.setdefault("single_task_model", res.model)  # InterroGate starts its task branches from it
    return res


@register_method("oracle", {"init": "scratch"})
def oracle(ctx: MethodContext) -> MethodResult:
    """The dataset's known grouping (planted groups; MultiMNIST left / right digit) trained as given."""
    if not ctx.data.groups:
        raise ValueError(f"method 'oracle' needs a dataset with a known grouping; {ctx.data.name!r} has none")
    grouping = Grouping.partition(ctx.data.groups, method="oracle")
    res = fit_grouping(ctx, grouping, "oracle", init=ctx.option("init", "scratch"))
    res.n_networks = len(grouping.groups)
    return res


@register_method("fixed", {"groups": None, "init": "scratch"})
def fixed(ctx: MethodContext) -> MethodResult:
    """A user-given grouping (``fixed.groups``: list of task-name lists) trained from scratch or from
    the naive-MTL weights (``fixed.init=naive_mtl``)."""
    groups = ctx.option("groups", None)
    if not groups:
        raise ValueError("method 'fixed' needs fixed.groups, a list of task-name lists")
    from taskgrouping.models.branched import validate_groups

    validate_groups(groups, ctx.data.task_names, allow_overlap=False)
    grouping = Grouping.partition(groups, method="fixed")
    res = fit_grouping(ctx, grouping, "fixed", init=ctx.option("init", "scratch"))
    res.n_networks = len(grouping.groups)
    return res


@register_method("random", {"draws": 1})
def random(ctx: MethodContext) -> MethodResult:
    """Random partitions into K non-empty groups, each trained; metrics averaged over ``draws``."""
    from taskgrouping.grouping.random_grouping import random_partitions

    draws = int(ctx.option("draws", 1))
    if draws < 1:
        raise ValueError(f"random.draws must be >= 1, got {draws}")
    groupings = random_partitions(ctx.data.task_names, ctx.K, draws, seed=ctx.seed)
    results = [fit_grouping(ctx, g, f"random_{i}") for i, g in enumerate(groupings)]
    per_task = {t: {m: sum(r.per_task[t][m] for r in results) / draws for m in results[0].per_task[t]}
                for t in ctx.data.task_names}
    val = {t: {m: sum(r.val_per_task[t][m] for r in results) / draws for m in results[0].val_per_task[t]}
           for t in ctx.data.task_names}
    first = results[0]
    return MethodResult(first.grouping, first.model, per_task, val, sum(r.train_seconds for r in results),
                        n_networks=sum(len(g.groups) for g in groupings),
                        extra={"draws": [{"grouping": r.grouping.as_lists(), "per_task": r.per_task} for r in results],
                               "averaged_over_draws": draws})
