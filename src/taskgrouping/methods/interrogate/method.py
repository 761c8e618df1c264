"""The ``interrogate`` method: InterroGate (Bejnordi et al., ICML 2024) learns, per layer, channel
and task, whether the task reads its own features or the shared ones under a compute budget, then
prunes what no task uses.

InterroGate is *not* a grouping method: every task keeps its own (partly shared) path, so its
:class:`~taskgrouping.methods.base.MethodResult` reports the trivial grouping "all tasks in one
group" and puts what it learned - the per-layer sharing pattern, FLOPs and parameters before and
after compiling - in ``extra``. With ``init: baselines`` each task branch (and head) starts from the
run's single-task network and the shared branch (and the ungated stem) from its naive-MTL network,
both trained by :mod:`taskgrouping.methods.baselines`; the gates start task-specific, so training
starts from the STL solution. The trained gated network is compiled to the static pruned network
(:meth:`~taskgrouping.methods.interrogate.network.GatedNetwork.compile`), the method's model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from taskgrouping.device import model_device
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.baselines import fit_grouping, naive_mtl_model
from taskgrouping.flops import count_flops, count_parameters
from taskgrouping.methods.interrogate.network import GatedNetwork, build_gated_network
from taskgrouping.methods.interrogate.objective import InterroGateObjective
from taskgrouping.methods.interrogate.options import InterroGateOptions
from taskgrouping.methods.interrogate.serialization import save_compiled
from taskgrouping.models.branched import BranchedModel

__all__ = ["interrogate", "single_task_model", "build_interrogate_model", "reference_flops",
           "max_output_difference", "NOT_A_GROUPING"]

NOT_A_GROUPING = ("InterroGate is not a grouping method: every task keeps its own partly shared path; the grouping "
                  "is reported as one group of all tasks and the learned sharing is in 'sharing_pattern'")


def single_task_model(ctx: MethodContext) -> BranchedModel:
    """The run's trained single-task model (N branches; trained now, under
    ``warm_start_single_task/``, unless a method already put it in ``ctx.cache``)."""
    if "single_task_model" not in ctx.cache:
        grouping = Grouping.partition([[t] for t in ctx.data.task_names], method="single_task")
        res = fit_grouping(ctx, grouping, "warm_start_single_task")
        ctx.cache["single_task_model"] = res.model
        ctx.cache["single_task_seconds"] = res.train_seconds
    return ctx.cache["single_task_model"]


def build_interrogate_model(ctx: MethodContext, options: InterroGateOptions) -> tuple[GatedNetwork, float]:
    """The gated network for the run's tasks and backbone, and the seconds spent training the
    baselines it starts from (0 when they were cached)."""
    names = ctx.data.task_names
    if options.init == "baselines":
        before = {k for k in ("naive_mtl_model", "single_task_model") if k in ctx.cache}
        mtl = naive_mtl_model(ctx)
        stl = single_task_model(ctx)
        seconds = sum(ctx.cache.get(k.replace("_model", "_seconds"), 0.0)
                      for k in ("naive_mtl_model", "single_task_model") if k not in before)
        shared, stem = mtl.branches[0], mtl.stem
        tasks = {t: stl.branches[stl.serves[t]] for t in names}
        heads = {t: stl.head(stl.serves[t], t) for t in names}
    else:
        groups = [(t,) for t in names] + [tuple(names)]
        fresh = ctx.build_model(Grouping(tuple(groups), {t: i for i, t in enumerate(names)}))
        shared, stem, seconds = fresh.branches[len(names)], fresh.stem, 0.0
        tasks = {t: fresh.branches[i] for i, t in enumerate(names)}
        heads = {t: fresh.head(i, t) for i, t in enumerate(names)}
    return build_gated_network(shared, tasks, heads, stem=stem, gate_init=options.gate_init), seconds


def reference_flops(ctx: MethodContext) -> dict[str, int]:
    """FLOPs of the run's single-task and naive-MTL networks (same backbone and heads)."""
    names = ctx.data.task_names
    shape = ctx.data.input_shape
    stl = ctx.cache.get("single_task_model")
    if stl is None:
        stl = ctx.build_model(Grouping.partition([[t] for t in names]))
    mtl = ctx.cache.get("naive_mtl_model")
    if mtl is None:
        mtl = ctx.build_model(Grouping.partition([names]))
    return {"single_task": count_flops(stl, shape), "naive_mtl": count_flops(mtl, shape)}


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Largest absolute difference between two ``{task: prediction}`` models' eval outputs on ``x``."""
    modes = a.training, b.training
    pa, pb = a.eval()(x), b.eval()(x)
    a.train(modes[0])
    b.train(modes[1])
    return max(float((pa[t].float() - pb[t].float()).abs().max()) for t in pa)


@register_method("interrogate", InterroGateOptions)
def interrogate(ctx: MethodContext) -> MethodResult:
    """Learned per-channel sharing between task branches and a shared branch, pruned to a static
    network (Bejnordi et al. 2024). Not a grouping method: reports one group of all tasks."""
    opts = ctx.opts(InterroGateOptions)
    opts.check_data(ctx.data)
    model, baseline_seconds = build_interrogate_model(ctx, opts)
    objective = InterroGateObjective(model, ctx.data.tasks, opts, base_lr=ctx.train.lr)
    # The gated phase keeps its last epoch: the sparsity trade-off is where the schedule ends, and
    # restoring the best-validation epoch would undo the gates (it is often the first, before they move).
    # ``interrogate.epochs`` sets the length of this fine-tuning phase (default: train.epochs).
    epochs = opts.epochs or ctx.train.epochs
    gated_ctx = dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, select="last", early_stopping=0,
                                                                   epochs=int(epochs)))
    result, val, _ = gated_ctx.fit(model, "interrogate", score_test=False, objective=objective)
    gated: GatedNetwork = result.model
    compiled = gated.compile().eval()
    kept = gated.compile(kept_only=True).eval()  # the pruned network InterroGate's paper counts
    _, _, test_loader = ctx.loaders()
    test = evaluate(compiled, test_loader, ctx.data.tasks)
    x, _ = next(iter(test_loader))
    shape = ctx.data.input_shape
    pattern = gated.sharing_pattern()
    names = gated.task_names
    extra: dict[str, Any] = {
        "note": NOT_A_GROUPING,
        "options": opts.resolved(ctx.data.tasks),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "baseline_seconds": baseline_seconds,
        "flops": {"gated": count_flops(gated, shape), "compiled": count_flops(kept, shape),
                  "compiled_executed": count_flops(compiled, shape), **reference_flops(ctx)},
        "params": {"gated": count_parameters(gated, gated.gate_parameters()),
                   "gates": sum(p.numel() for p in gated.gate_parameters()),
                   "compiled": count_parameters(kept), "compiled_executed": count_parameters(compiled)},
        "task_specific_fraction": {t: sum(r["task_specific_fraction"][t] for r in pattern) / len(pattern)
                                   for t in names},
        "sharing_pattern": pattern,
        "compile_max_abs_diff": max_output_difference(gated, compiled, x.to(model_device(gated))),
        "gate_history": [h.get("gates") for h in result.history],
    }
    if ctx.workdir is not None:
        extra["compiled_dir"] = str(save_compiled(compiled, ctx.workdir / "compiled"))
    grouping = Grouping.partition([names], method="interrogate", note=NOT_A_GROUPING)
    return MethodResult(grouping, compiled, test, val, result.train_seconds + baseline_seconds, n_networks=1,
                        extra=extra)
