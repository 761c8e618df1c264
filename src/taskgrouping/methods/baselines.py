"""Methods that train a *given* grouping: naive MTL (one group), single-task learning (N groups),
the dataset's known grouping (``oracle``), a user's grouping (``fixed``) and random groupings.

All of them are "K branches with a given assignment": :func:`fit_grouping` builds the branched
model and trains and scores it through the run engine (:func:`taskgrouping.engine.fit.fit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from taskgrouping.data.base import TaskData
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.grouping.random_grouping import random_partitions
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.options import MethodOptions, expect, expect_choice, expect_int
from taskgrouping.models.branched import BranchedModel, validate_groups


def fit_grouping(ctx: MethodContext, grouping: Grouping, tag: str, init: str = "scratch") -> MethodResult:
    """Train ``grouping`` from scratch or from the naive-MTL weights (``init="naive_mtl"``)."""
    if init not in INITS:
        raise ValueError(f"{ctx.name}.init must be 'scratch' or 'naive_mtl', got {init!r}")
    model = ctx.build_model(grouping)
    if init == "naive_mtl":
        model.load_from_single_branch(naive_mtl_model(ctx))
    result, val, test = ctx.fit(model, tag)
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


INITS = ("scratch", "naive_mtl")


@dataclass(frozen=True)
class OracleOptions(MethodOptions):
    """``init``: train from scratch or from the run's naive-MTL weights."""

    init: str = "scratch"

    def __post_init__(self) -> None:
        expect_choice("init", self.init, INITS)

    def check_data(self, data: TaskData) -> None:
        if not data.groups:
            raise ValueError(f"method 'oracle' needs a dataset with a known grouping; {data.name!r} has none")


@register_method("oracle", OracleOptions)
def oracle(ctx: MethodContext) -> MethodResult:
    """The dataset's known grouping (planted groups; MultiMNIST left / right digit) trained as given."""
    opts = ctx.opts(OracleOptions)
    opts.check_data(ctx.data)
    grouping = Grouping.partition(ctx.data.groups, method="oracle")
    res = fit_grouping(ctx, grouping, "oracle", init=opts.init)
    res.n_networks = len(grouping.groups)
    return res


@dataclass(frozen=True)
class FixedOptions(MethodOptions):
    """``groups``: the task-name lists to train; ``init`` as for ``oracle``."""

    groups: Any = None
    init: str = "scratch"

    def __post_init__(self) -> None:
        expect_choice("init", self.init, INITS)
        expect(isinstance(self.groups, list) and bool(self.groups)
               and all(isinstance(g, list) and g and all(isinstance(t, str) for t in g) for g in self.groups),
               "groups", "a non-empty list of non-empty task-name lists", self.groups)

    def check_data(self, data: TaskData) -> None:
        try:
            validate_groups(self.groups, data.task_names, allow_overlap=False)
        except ValueError as exc:
            raise ValueError(f"fixed.groups: {exc}") from None


@register_method("fixed", FixedOptions)
def fixed(ctx: MethodContext) -> MethodResult:
    """A user-given grouping (``fixed.groups``: list of task-name lists) trained from scratch or from
    the naive-MTL weights (``fixed.init=naive_mtl``)."""
    opts = ctx.opts(FixedOptions)
    opts.check_data(ctx.data)
    grouping = Grouping.partition(opts.groups, method="fixed")
    res = fit_grouping(ctx, grouping, "fixed", init=opts.init)
    res.n_networks = len(grouping.groups)
    return res


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """``draws``: random partitions to train and average over."""

    draws: int = 1

    def __post_init__(self) -> None:
        expect_int("draws", self.draws, low=1)


@register_method("random", RandomOptions)
def random(ctx: MethodContext) -> MethodResult:
    """Random partitions into K non-empty groups, each trained; metrics averaged over ``draws``."""
    draws = ctx.opts(RandomOptions).draws
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
