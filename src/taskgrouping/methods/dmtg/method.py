"""The registered ``dmtg`` method: one-shot differentiable grouping into at most K groups (Gao et al. 2024).

Weights and S train together (:class:`~taskgrouping.methods.dmtg.objective.DMTGObjective`); task i's
group is argmax_k S_ik, empty groups are dropped, and the pruned model (N heads) is the result: no
retraining. Without a warm start the weights start as the grouped model of S's initial assignment
would at the same seed (:func:`start_from_initial_grouping`), so DMTG and a fixed grouping are a paired
comparison instead of two draws of initialisation luck. Optional: fine-tuning the pruned model and
retraining the found grouping (``retrain``), recorded as variants.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch

from taskgrouping.engine.evaluation import evaluate
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.baselines import fit_grouping, naive_mtl_model
from taskgrouping.methods.dmtg.model import DMTGModel
from taskgrouping.methods.dmtg.objective import DMTGObjective
from taskgrouping.methods.dmtg.options import DMTGOptions
from taskgrouping.methods.dmtg.prior import initial_s
from taskgrouping.models.branched import BranchedModel

__all__ = ["dmtg", "start_from_initial_grouping", "warm_start_model"]


def warm_start_model(ctx: MethodContext, opts: DMTGOptions) -> tuple[BranchedModel | None, float]:
    """The naive-MTL model the branches start from: the run's converged one (``warm_epochs`` unset) or a
    short naive-MTL run of ``warm_epochs`` epochs (last epoch kept), and its training seconds."""
    if not opts.warm_start:
        return None, 0.0
    epochs = opts.warm_epochs
    if epochs is None:
        model = naive_mtl_model(ctx)
        return model, float(ctx.cache.get("naive_mtl_seconds", 0.0))
    key = f"naive_mtl_{epochs}ep"
    if key not in ctx.cache:
        short = replace(ctx, train=replace(ctx.train, epochs=epochs, early_stopping=0, select="last"))
        res = fit_grouping(short, Grouping.partition([ctx.data.task_names]), f"warm_start_{epochs}ep")
        ctx.cache[key] = (res.model, res.train_seconds)
    return ctx.cache[key]


@torch.no_grad()
def start_from_initial_grouping(ctx: MethodContext, net: BranchedModel, s0: torch.Tensor) -> None:
    """Give ``net`` (K branches x all N heads) the initial weights of the grouped model of S's initial
    assignment (argmax of ``s0``), as the ``fixed`` / ``oracle`` methods would build it at this seed,
    with each task's head copied into every branch (like the paper's identical copies).

    DMTG then differs from training its initial grouping only by what S's learning changes, so the
    two are a paired comparison instead of two draws of initialisation luck (on planted, init alone
    moves the total test loss by about 1 %).
    """
    assign = s0.argmax(dim=1).tolist()
    names = ctx.data.task_names
    used = sorted(set(assign))
    grouped = ctx.build_model(Grouping.partition([[t for t, k in zip(names, assign) if k == g] for g in used]))
    net.stem.load_state_dict(grouped.stem.state_dict())
    for j, g in enumerate(used):
        net.branches[g].load_state_dict(grouped.branches[j].state_dict())
    for t, g in zip(names, assign):
        head = grouped.head(used.index(g), t).state_dict()
        for k in range(len(net.branches)):
            net.head(k, t).load_state_dict(head)


def options_record(opts: DMTGOptions, init_used: str) -> dict[str, Any]:
    """The resolved options as results.json records them (``init_used``: what ``init=auto`` chose)."""
    record = dict(asdict(opts), retrain=list(opts.retrain))
    if opts.init == "auto":
        record["init_used"] = init_used
    return record


@register_method("dmtg", DMTGOptions)
def dmtg(ctx: MethodContext) -> MethodResult:
    """One-shot differentiable grouping into at most K groups (Gao et al. 2024)."""
    opts = ctx.opts(DMTGOptions)
    opts.check_data(ctx.data)
    if opts.s_warmup_fraction:
        opts = replace(opts, s_warmup_epochs=round(float(opts.s_warmup_fraction) * ctx.train.epochs))
    N, K = len(ctx.data.tasks), ctx.K
    if K < 1 or K > N:
        raise ValueError(f"dmtg needs 1 <= K <= number of tasks ({N}), got K={K}")
    warm, warm_seconds = warm_start_model(ctx, opts)
    s0, affinity, init_used = initial_s(ctx, opts, warm)
    net = ctx.build_model(Grouping((tuple(ctx.data.task_names),) * K, {t: 0 for t in ctx.data.task_names}))
    if warm is not None:
        net.load_from_single_branch(warm)
    else:
        start_from_initial_grouping(ctx, net, s0)
    model = DMTGModel(net, ctx.data.task_names, s0, opts.grad_scaling)
    stops_early = ctx.train.early_stopping > 0
    fit_ctx = ctx
    if opts.add_hold_epochs and not stops_early:  # the hold does not shorten the grouped model's training
        fit_ctx = replace(ctx, train=replace(ctx.train, epochs=ctx.train.epochs + int(opts.s_warmup_epochs)))
    objective = DMTGObjective(ctx.data.tasks, opts, fit_ctx.train.epochs, early_stopping=stops_early,
                              max_extension=round(float(opts.converge_extension) * ctx.train.epochs))
    result, _, _ = fit_ctx.fit(model, "dmtg", score_test=False, objective=objective)
    model = result.model
    grouping = model.grouping()
    pruned = model.pruned()
    _, val_loader, test_loader = ctx.loaders()
    seconds = result.train_seconds
    if opts.finetune_epochs > 0:
        ft_ctx = replace(ctx, train=replace(ctx.train, epochs=opts.finetune_epochs))
        ft, _, _ = ft_ctx.fit(pruned, "dmtg_finetune", score_test=False)
        pruned = ft.model
        seconds += ft.train_seconds
    val = evaluate(pruned, val_loader, ctx.data.tasks)
    test = evaluate(pruned, test_loader, ctx.data.tasks)
    history = [{"epoch": h["epoch"], "tau": h.get("tau"), "live_heads": h.get("live_heads"),
                "assignment_probs": h.get("assignment_probs")} for h in result.history]
    extra: dict[str, Any] = {
        "recipe": opts.recipe, "options": options_record(opts, init_used), "best_epoch": result.best_epoch,
        "epochs": fit_ctx.train.epochs, "epochs_run": result.epochs_run, "epochs_added": objective.extended,
        "assignment_probs": model.probabilities().tolist(), "S": model.S.detach().tolist(),
        "live_heads_final": int(model.live.sum()), "live_heads_history": [h["live_heads"] for h in history],
        "dmtg_history": history, "warm_start_seconds": warm_seconds, "s_converged_epoch": objective.converged_at,
        "affinity_prior": affinity.tolist() if affinity is not None else None,
        "one_shot": opts.finetune_epochs == 0,
    }
    if opts.select_converged and objective.converged_at is None:
        steps = sum(h.get("steps", 0) for h in result.history[int(opts.s_warmup_epochs):])
        extra["warning"] = (f"S had not converged when training ended ({steps} steps after the hold); the grouping "
                            "is S's argmax: give it more steps (train.epochs, a smaller train.batch_size or "
                            "dmtg.converge_extension)")
    variants = {f"retrain_{init}": fit_grouping(ctx, grouping, f"retrain_{init}", init=init) for init in opts.retrain}
    if variants:
        extra["variants"] = variants
    if ctx.figures_dir is not None and history and history[-1]["assignment_probs"] is not None:
        from taskgrouping.report import assignment_heatmaps

        ctx.figures_dir.mkdir(parents=True, exist_ok=True)
        figure = ctx.figures_dir / f"{ctx.name or 'dmtg'}_assignment.png"
        assignment_heatmaps([h["assignment_probs"] for h in history], ctx.data.task_names, figure)
        extra["assignment_figure"] = str(figure)
    ctx.cache["dmtg_model"] = model
    return MethodResult(grouping, pruned, test, val, seconds + warm_seconds, n_networks=1, extra=extra)
