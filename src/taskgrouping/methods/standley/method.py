"""Standley et al. (ICML 2020), "Which Tasks Should Be Learned Together in Multi-task Learning?",
as end-to-end methods: ``optimal``, ``hoa`` and ``esa``.

First shot: train task-subset networks on the run's data and score each task on validation
(selection) and test (report):

* ``optimal``: every non-empty task subset, fully trained (2^N - 1 networks; refused above
  ``max_tasks`` tasks, default 10, i.e. 1,023 networks);
* ``hoa`` (higher-order approximation, Sec. 3.3): single-task and pair networks, fully trained; a
  network of >= 3 tasks is *estimated*: each task's loss = mean of its losses in the pair networks
  inside the set (:func:`~taskgrouping.methods.standley.estimates.hoa_networks`);
* ``esa`` (early-stopping approximation, Sec. 3.3): every subset, trained for ``early_fraction``
  (default 20 %) of the epochs; selection reads those early losses.

With ``half_size`` (default on) the first shot also trains a half-size single-task network per task
(cost 0.5; see :func:`~taskgrouping.methods.standley.half_size.half_size_options`). Networks are then chosen with
:func:`~taskgrouping.methods.standley.selection.select_networks` under ``budget`` (in units of one
full-size network; default K), minimising the sum over tasks of each task's best validation loss.

Second shot: the chosen networks become one :class:`~taskgrouping.models.branched.BranchedModel`,
one branch per network (groups may overlap). Networks that were trained fully are reused as they
are; HOA's >= 3-task networks are trained now; ESA's chosen networks continue from their early
checkpoint to the full epoch count (the early epochs are not repeated). Each task is served by the
chosen network with its lowest *measured* validation loss (for HOA and ESA this can differ from the
estimate the selection used; both are recorded).

Recorded (results.json): ``budget`` (= the encoder-complexity class), the networks trained with
their cost, phase, seconds and losses, ``n_networks`` (distinct networks trained), ``trained_cost``
(their total cost), ``train_seconds`` (every training, subset networks included), the selection's
own total and serving.
"""

from __future__ import annotations

import itertools
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from taskgrouping.engine.jobs import TrainingJob
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.standley.estimates import hoa_networks
from taskgrouping.methods.standley.half_size import half_size_options
from taskgrouping.methods.standley.networks import Network
from taskgrouping.methods.standley.options import ESAOptions, HOAOptions, OptimalOptions, StandleyOptions
from taskgrouping.methods.standley.selection import resolve_solver, select_networks
from taskgrouping.methods.two_shot import (TrainedNetwork, fan_out, network_tag, networks_result,
                                           serve_by_validation, subset_job)

__all__ = ["optimal", "hoa", "esa"]

def _subsets(tasks: Sequence[str], sizes: range) -> list[tuple[str, ...]]:
    """Task subsets in Standley's order: by size, then lexicographically by task index."""
    return [c for r in sizes for c in itertools.combinations(tasks, r)]


def _check_cover(tasks: Sequence[str], sets: Sequence[tuple[tuple[str, ...], float]], budget: float) -> None:
    """Fail before training when no set of candidates within ``budget`` covers every task (the
    error of :func:`select_networks`, which names the cheapest covering cost)."""
    dummies = [Network(s, c, dict.fromkeys(s, 0.0)) for s, c in sets]
    select_networks(dummies, budget, tasks=tasks, solver="milp")


def _first_shot_sets(tasks: Sequence[str], opts: StandleyOptions) -> tuple[list[tuple[str, ...]],
                                                                          list[tuple[str, ...]]]:
    """(task sets trained in the first shot, >= 3-task sets HOA estimates instead)."""
    if isinstance(opts, HOAOptions):
        return _subsets(tasks, range(1, 3)), _subsets(tasks, range(3, opts.largest_group(len(tasks)) + 1))
    return _subsets(tasks, range(1, len(tasks) + 1)), []


def _standley(ctx: MethodContext, approx: str, opts: StandleyOptions) -> MethodResult:
    tasks = ctx.data.task_names
    budget = float(ctx.K) if opts.budget is None else float(opts.budget)
    half = opts.half_size
    half_opts = (half_size_options(ctx.model.get("backbone"), ctx.model.get("options"), ctx.data.input_shape)
                 if half else None)
    opts.check_data(ctx.data)
    trained_sets, estimated = _first_shot_sets(tasks, opts)
    half_sets = [(t,) for t in tasks] if half else []
    _check_cover(tasks, [(s, 0.5) for s in half_sets] + [(s, 1.0) for s in trained_sets + estimated], budget)

    early_epochs = None
    if isinstance(opts, ESAOptions):
        early_epochs = max(1, round(opts.early_fraction * ctx.train.epochs))
    # ESA continues the chosen networks from their early checkpoints, so it needs a directory.
    scratch = tempfile.TemporaryDirectory(prefix="esa_") if approx == "esa" and ctx.workdir is None else nullcontext()
    with scratch as tmp:
        if tmp is not None:
            ctx = replace(ctx, workdir=Path(tmp))
        phase = "early" if approx == "esa" else "candidate"
        specs = ([(s, 0.5, subset_job(ctx, network_tag(ctx, "net", s, "_half"), s, model_options=half_opts,
                                      epochs=early_epochs)) for s in half_sets]
                 + [(s, 1.0, subset_job(ctx, network_tag(ctx, "net", s), s, epochs=early_epochs))
                    for s in trained_sets])
        results = fan_out(ctx, [job for _, _, job in specs], opts)
        first = [TrainedNetwork(job, res, cost, phase) for (_, cost, job), res in zip(specs, results)]
        measured = [Network(net.tasks, net.cost, net.result.loss("val")) for net in first]
        candidates = hoa_networks(measured, extra_sets=estimated) if approx == "hoa" else measured
        solver = resolve_solver(opts.solver, len(candidates))
        selection = select_networks(candidates, budget, tasks=tasks, solver=solver)

        # second shot: reuse what was trained fully, train HOA's estimated networks, finish ESA's
        by_key = {(frozenset(net.tasks), net.cost): net for net in first}
        final: list[TrainedNetwork | None] = []
        to_train: list[tuple[int, float, TrainingJob]] = []
        for i, chosen in enumerate(selection.networks):
            have = by_key.get(chosen.key)
            if approx == "esa":
                suffix = "_half" if chosen.cost == 0.5 else ""
                to_train.append((i, chosen.cost, subset_job(
                    ctx, network_tag(ctx, "full", chosen.tasks, suffix), chosen.tasks,
                    model_options=have.job.model_options, init_from=have.job.checkpoint_dir,
                    continues_from=early_epochs)))
            elif have is None:  # HOA's estimate of a >= 3-task network
                to_train.append((i, chosen.cost, subset_job(ctx, network_tag(ctx, "final", chosen.tasks),
                                                            chosen.tasks)))
            final.append(have if approx != "esa" else None)
        second = fan_out(ctx, [job for _, _, job in to_train], opts)
        for (i, cost, job), res in zip(to_train, second):
            final[i] = TrainedNetwork(job, res, cost, "full" if approx == "esa" else "final")
    networks = [net for net in final if net is not None]
    serves = serve_by_validation(ctx, networks)
    index = {id(n): k for k, n in enumerate(selection.networks)}
    later = [net for net in networks if net.phase in ("final", "full")]
    new_networks = len(later) if approx == "hoa" else 0  # ESA's "full" networks continue early ones
    extra = {
        "approximation": approx, "budget": budget, "encoder_complexity": budget, "solver": solver,
        "n_candidates": len(candidates), "selection_total": selection.total, "selection_cost": selection.cost,
        "selection_serves": {t: index[id(net)] for t, net in selection.serving.items()},
        "trained_cost": sum(net.cost for net in first + (later if approx == "hoa" else [])),
        "half_size_options": half_opts, "early_epochs": early_epochs,
        "networks": [net.record() for net in first + later],
        "chosen": [dict(net.record(), reused=net.phase == phase) for net in networks],
    }
    seconds = sum(net.result.train_seconds for net in first + later)
    return networks_result(ctx, networks, serves, seconds, len(first) + new_networks, extra,
                           method=approx, budget=budget, costs=[net.cost for net in networks])


@register_method("optimal", OptimalOptions)
def optimal(ctx: MethodContext) -> MethodResult:
    """Standley's exhaustive network selection: every task subset trained, the best networks within
    the budget chosen on validation losses."""
    return _standley(ctx, "optimal", ctx.opts(OptimalOptions))


@register_method("hoa", HOAOptions)
def hoa(ctx: MethodContext) -> MethodResult:
    """Standley's higher-order approximation: singles and pairs trained, >= 3-task networks estimated
    from the pairs inside them; chosen >= 3-task networks trained afterwards."""
    return _standley(ctx, "hoa", ctx.opts(HOAOptions))


@register_method("esa", ESAOptions)
def esa(ctx: MethodContext) -> MethodResult:
    """Standley's early-stopping approximation: every task subset trained for ``early_fraction`` of
    the epochs, selection on those losses, chosen networks trained to the end."""
    return _standley(ctx, "esa", ctx.opts(ESAOptions))
