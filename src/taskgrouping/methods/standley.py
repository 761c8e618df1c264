"""Standley et al. (ICML 2020), "Which Tasks Should Be Learned Together in Multi-task Learning?",
as end-to-end methods: ``optimal``, ``hoa`` and ``esa``.

First shot: train task-subset networks on the run's data and score each task on validation
(selection) and test (report):

* ``optimal``: every non-empty task subset, fully trained (2^N - 1 networks; refused above
  ``max_tasks`` tasks, default 10, i.e. 1,023 networks);
* ``hoa`` (higher-order approximation, Sec. 3.3): single-task and pair networks, fully trained; a
  network of >= 3 tasks is *estimated*: each task's loss = mean of its losses in the pair networks
  inside the set (:func:`~taskgrouping.grouping.network_selection.hoa_networks`);
* ``esa`` (early-stopping approximation, Sec. 3.3): every subset, trained for ``early_fraction``
  (default 20 %) of the epochs; selection reads those early losses.

With ``half_size`` (default on) the first shot also trains a half-size single-task network per task
(cost 0.5; see :func:`half_size_options`). Networks are then chosen with
:func:`~taskgrouping.grouping.network_selection.select_networks` under ``budget`` (in units of one
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

import inspect
import itertools
import math
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from taskgrouping.grouping.network_selection import Network, hoa_networks, select_networks
from taskgrouping.engine.jobs import TrainingJob
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.two_shot import (FANOUT_OPTIONS, TrainedNetwork, fan_out, network_tag,
                                           networks_result, serve_by_validation, subset_job)
from taskgrouping.models.backbones import BACKBONES, build_backbone, default_backbone

#: Candidate networks up to which ``solver="auto"`` uses Standley's exact search (else the MILP).
SEARCH_MAX_CANDIDATES = 64
#: HOA: most estimated (>= 3-task) candidate networks handed to the selection.
HOA_MAX_ESTIMATES = 100_000

_COMMON = dict(FANOUT_OPTIONS, budget=None, half_size=True, solver="auto")


# -- half-size networks ---------------------------------------------------------------------

def _scale_mlp(opts: dict[str, Any], s: float) -> dict[str, Any]:
    return dict(opts, widths=[max(1, round(int(w) * s)) for w in opts["widths"]])


def _scale_small_cnn(opts: dict[str, Any], s: float) -> dict[str, Any]:
    return dict(opts, channels=[max(1, round(int(c) * s)) for c in opts["channels"]],
                feature_dim=max(1, round(int(opts["feature_dim"]) * s)))


def _scale_width(opts: dict[str, Any], s: float) -> dict[str, Any]:
    return dict(opts, width=max(1, round(int(opts["width"]) * s)))


#: Backbones whose half-size version is found by scaling these options by one factor.
_SCALED: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], float], dict[str, Any]]]] = {
    "mlp": (("widths",), _scale_mlp),
    "small_cnn": (("channels", "feature_dim"), _scale_small_cnn),
    "resnet18": (("width",), _scale_width),
    "resnet20": (("width",), _scale_width),
    "tag_resnet": (("width",), _scale_width),
}
HALF_SIZE_BACKBONES: tuple[str, ...] = tuple(sorted(set(_SCALED) | {"xception"}))
_HALF_CACHE: dict[tuple, dict[str, Any]] = {}


def _flops(name: str, options: Mapping[str, Any], input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the backbone's linear and convolution layers on one input.

    Counted with forward hooks (cheaper to import than ``torch.utils.flop_counter``, which pulls in
    ``torch._dynamo``; the same count for these layers): a linear layer costs ``in x out`` per
    position, a convolution ``in / groups x kernel area`` per output element.
    """
    with torch.random.fork_rng(devices=[]):
        net = build_backbone(name, input_shape, **options).eval()
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = [m.register_forward_hook(count) for m in net.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def half_size_options(backbone: str | None, options: Mapping[str, Any] | None,
                      input_shape: Sequence[int]) -> dict[str, Any]:
    """Backbone options of Standley's half-size network (cost 0.5): compute halved.

    Per backbone:

    * ``xception``: ``width`` x 2^-1/2, Standley's channel scaling (0.505x the FLOPs at 256x256; see
      :mod:`taskgrouping.models.xception`);
    * ``mlp`` (``widths``), ``small_cnn`` (``channels`` and ``feature_dim``), ``resnet18``,
      ``resnet20``, ``tag_resnet`` (``width``): those options multiplied by one factor ``s`` and
      rounded, with ``s`` chosen so that the backbone's compute on one input of ``input_shape``
      (multiply-accumulates of its linear and convolution layers; heads excluded) is closest to
      half the full network's. One factor scales all listed options, so the network keeps its shape. For a wide-input
      MLP ``s`` is near 1/2 (the first layer dominates); for convolutional nets near 2^-1/2.

    Raises:
        ValueError: any other backbone (including a module given instead of a name).
    """
    name = backbone if backbone is not None else default_backbone(input_shape)
    opts = dict(options or {})
    key = (name, repr(sorted(opts.items())), tuple(input_shape)) if isinstance(name, str) else None
    if key in _HALF_CACHE:
        return dict(_HALF_CACHE[key])
    if not isinstance(name, str) or name not in HALF_SIZE_BACKBONES:
        shown = name if isinstance(name, str) else type(name).__name__
        raise ValueError(f"half-size networks: backbone {shown!r} has no half-size rule; supported: "
                         f"{list(HALF_SIZE_BACKBONES)}. Set the method's half_size: false to train "
                         "full-size networks only")
    if name == "xception":
        return dict(opts, width=float(opts.get("width", 1.0)) * 2 ** -0.5)
    keys, scale = _SCALED[name]
    full_flops = _flops(name, opts, input_shape)  # also registers the builtin backbones
    params = inspect.signature(BACKBONES[name]).parameters
    full = dict(opts)
    for k in keys:
        full.setdefault(k, params[k].default)
    grid = np.round(np.arange(0.05, 1.0, 0.005), 3)
    cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def ratio(i: int) -> tuple[float, dict[str, Any]]:
        cand = scale(full, float(grid[i]))
        key = repr(sorted(cand.items()))
        if key not in cache:
            cache[key] = (_flops(name, cand, input_shape) / full_flops, cand)
        return cache[key]

    lo, hi = 0, len(grid) - 1  # FLOPs grow with s: find the first grid point at or above one half
    while lo < hi:
        mid = (lo + hi) // 2
        if ratio(mid)[0] >= 0.5:
            hi = mid
        else:
            lo = mid + 1
    options_near = [ratio(i) for i in (lo - 1, lo) if 0 <= i < len(grid)]
    _HALF_CACHE[key] = min(options_near, key=lambda rc: abs(rc[0] - 0.5))[1]
    return dict(_HALF_CACHE[key])


# -- the pipeline ---------------------------------------------------------------------------

def _budget(ctx: MethodContext) -> float:
    budget = ctx.option("budget", None)
    if budget is None:
        return float(ctx.K)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"{ctx.name}.budget must be a positive number (cost of one full-size network = 1), "
                         f"got {budget!r}")
    return float(budget)


def _int_option(ctx: MethodContext, key: str, default: int) -> int:
    value = ctx.option(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{ctx.name}.{key} must be a positive integer, got {value!r}")
    return value


def _solver(ctx: MethodContext, n_candidates: int) -> str:
    solver = ctx.option("solver", "auto")
    if solver not in ("auto", "search", "milp"):
        raise ValueError(f"{ctx.name}.solver must be 'auto', 'search' or 'milp', got {solver!r}")
    if solver == "auto":
        return "search" if n_candidates <= SEARCH_MAX_CANDIDATES else "milp"
    return solver


def _subsets(tasks: Sequence[str], sizes: range) -> list[tuple[str, ...]]:
    """Task subsets in Standley's order: by size, then lexicographically by task index."""
    return [c for r in sizes for c in itertools.combinations(tasks, r)]


def _check_cover(tasks: Sequence[str], sets: Sequence[tuple[tuple[str, ...], float]], budget: float) -> None:
    """Fail before training when no set of candidates within ``budget`` covers every task (the
    error of :func:`select_networks`, which names the cheapest covering cost)."""
    dummies = [Network(s, c, dict.fromkeys(s, 0.0)) for s, c in sets]
    select_networks(dummies, budget, tasks=tasks, solver="milp")


def _standley(ctx: MethodContext, approx: str) -> MethodResult:
    tasks = ctx.data.task_names
    n = len(tasks)
    budget = _budget(ctx)
    half = ctx.option("half_size", True)
    if not isinstance(half, bool):
        raise ValueError(f"{ctx.name}.half_size must be true or false, got {half!r}")
    half_opts = (half_size_options(ctx.model.get("backbone"), ctx.model.get("options"), ctx.data.input_shape)
                 if half else None)
    if approx in ("optimal", "esa"):
        max_tasks = _int_option(ctx, "max_tasks", 10)
        if n > max_tasks:
            raise ValueError(f"method {ctx.name!r} trains all 2^N - 1 = {2 ** n - 1} task subsets; {n} tasks exceed "
                             f"{ctx.name}.max_tasks={max_tasks}. Use 'hoa' (N + N(N-1)/2 networks) or raise "
                             f"{ctx.name}.max_tasks")
        trained_sets = _subsets(tasks, range(1, n + 1))
        estimated: list[tuple[str, ...]] = []
    else:
        trained_sets = _subsets(tasks, range(1, 3))
        largest = min(n, _int_option(ctx, "max_group_size", n))
        estimated = _subsets(tasks, range(3, int(largest) + 1))
        if len(estimated) > HOA_MAX_ESTIMATES:
            raise ValueError(f"hoa: {len(estimated)} estimated networks of >= 3 tasks exceed {HOA_MAX_ESTIMATES}; "
                             "set hoa.max_group_size to bound the size of the estimated networks")
    half_sets = [(t,) for t in tasks] if half else []
    _check_cover(tasks, [(s, 0.5) for s in half_sets] + [(s, 1.0) for s in trained_sets + estimated], budget)

    early_epochs = None
    if approx == "esa":
        fraction = float(ctx.option("early_fraction", 0.2))
        if not 0 < fraction <= 1:
            raise ValueError(f"esa.early_fraction must be in (0, 1], got {fraction}")
        early_epochs = max(1, round(fraction * ctx.train.epochs))
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
        results = fan_out(ctx, [job for _, _, job in specs])
        first = [TrainedNetwork(job, res, cost, phase) for (_, cost, job), res in zip(specs, results)]
        measured = [Network(net.tasks, net.cost, net.result.loss("val")) for net in first]
        candidates = hoa_networks(measured, extra_sets=estimated) if approx == "hoa" else measured
        solver = _solver(ctx, len(candidates))
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
        second = fan_out(ctx, [job for _, _, job in to_train])
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


@register_method("optimal", dict(_COMMON, max_tasks=10))
def optimal(ctx: MethodContext) -> MethodResult:
    """Standley's exhaustive network selection: every task subset trained, the best networks within
    the budget chosen on validation losses."""
    return _standley(ctx, "optimal")


@register_method("hoa", dict(_COMMON, max_group_size=None))
def hoa(ctx: MethodContext) -> MethodResult:
    """Standley's higher-order approximation: singles and pairs trained, >= 3-task networks estimated
    from the pairs inside them; chosen >= 3-task networks trained afterwards."""
    return _standley(ctx, "hoa")


@register_method("esa", dict(_COMMON, max_tasks=10, early_fraction=0.2))
def esa(ctx: MethodContext) -> MethodResult:
    """Standley's early-stopping approximation: every task subset trained for ``early_fraction`` of
    the epochs, selection on those losses, chosen networks trained to the end."""
    return _standley(ctx, "esa")
