"""Copies of one backbone run in a loop vs stacked into one vmapped call (``train.branches``), side by side.

Every network below holds several copies of the small_cnn backbone; ``set_branch_mode(model, mode)``
makes them run one after another (``loop``) or as one ``torch.func.vmap`` call (``stacked``,
:mod:`taskgrouping.models.stacked`). Measured for each mode, interleaved in ONE process:

1. naive-MTL step (one branch, all 8 heads; nothing to stack, measured once);
2. single-task step (8 branches, one head each), ÷ (8 x naive);
3. DMTG step (K branches with all heads, steps that learn S, no shared blocks), ÷ (K x naive), K = 2..5;
4. InterroGate training step (gated network of T + 1 = 9 streams, its sparsity loss and the gates'
   own Adam optimiser, lr 0.01, included), ÷ single-task step in the same mode and ÷ naive, with the
   gates held (logits ±8) at 50 % task-specific (the headline figure: every stream back-propagates) and at
   every gate 1 (the start of a training, where the loop skips the shared stream's backward pass);
   Beside it, InterroGate's gate selections and β mixtures alone (``G ⊙ φ + (1 − G) ⊙ ψ`` and
   ``Σ_t softmax(β)_t ⊙ φ'_t``, forward and backward, on the activation shapes of one step): the
   elementwise work its T + 1 convolution streams cannot avoid, so that ((T + 1)/T x STL step + those
   ops) ÷ STL step is the floor of the InterroGate ratio with these ops;
5. inference (eval, no grad) of InterroGate's compiled network ÷ the 8 single-task networks for the
   forced gate patterns of bench_interrogate.py (all task-specific, 75 / 50 / 25 %, all shared), with
   two FLOPs ratios: the kept channels alone (the pruned network InterroGate's paper counts, built with
   ``compile(kept_only=True)``) and what the compiled network computes (its first layer merged, its copies
   widened to aligned widths), divided by the STL networks in their faster mode (the compiled network
   is timed in both modes only if it has a ``branch_mode``); its outputs are checked against the gated
   network's (recorded, not a test); beside it, its weight layers alone (every Conv2d and Linear on the
   input a forward pass gave it) ÷ the STL networks' weight layers alone;
6. the operators each training step dispatches, in each mode (views and reads of a number into Python
   excluded; counted on the device the benchmark runs on): on a GPU each is at least one kernel launch,
   and these small steps are bound by launches there (one H200: naive MTL's step 6.7 ms for 1.3 ms of
   kernels).

Setting: on the CPU, MultiMNIST-sized inputs 1x28x28, batch 128, one thread; on CUDA (used when
available) CelebA-shaped inputs 3x64x64, batch 64, ``torch.cuda.synchronize()`` around every timing.
8 binary tasks (left/right x even, gt4, loop, prime), small_cnn {"channels": [16, 32], "feature_dim": 64},
Adam lr 1e-3. Each timing is one step; every round times every variant (the order reversed every
other round) and the medians over rounds are reported (the machine is shared and noisy). Before
timing, each network's losses on one batch and their gradients are computed in both modes from the same
weights (on CUDA with TF32 convolutions off): the stacked mode's losses must agree with the loop's to a
relative 1e-5, its gradients to 1e-4 (each parameter's ``‖g_stacked − g_loop‖ / ‖g_loop‖``; a sanity
check, recorded, not a test). Timings keep torch's default precision settings.

Writes benchmarks/results/branches.json on the CPU, branches_cuda.json on CUDA, and branches.md with the
tables of both that are there (``--quick``: few rounds, under a minute on 2 CPU cores, written to
branches_quick.json / branches_cuda_quick.json and branches_quick.md so that the full figures stay). The
last line printed is one JSON object: the four headline ratios of the mode ``train.branches=auto`` picks
on this device, ``mode``, ``device`` and ``by_mode`` (the same four ratios for each mode).

    OMP_NUM_THREADS=1 python benchmarks/bench_branches.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from taskgrouping.engine.driver import git_revision
from taskgrouping.engine.hooks import TaskLossObjective
from taskgrouping.engine.trainer import TrainConfig, make_optimizer, set_branch_mode
from taskgrouping.flops import count_flops
from taskgrouping.io import atomic_write_json, atomic_write_text
from taskgrouping.methods.dmtg import DMTGModel, DMTGObjective, DMTGOptions
from taskgrouping.methods.interrogate import GatePoint, InterroGateObjective, InterroGateOptions, build_gated_network
from taskgrouping.models.backbones import build_backbone, output_shape
from taskgrouping.models.branched import build_branched_model
from taskgrouping.models.heads import make_head
from taskgrouping.models.stacked import resolve_branch_mode
from taskgrouping.tasks import Task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_interrogate import PATTERNS, tasks  # noqa: E402  (the same tasks and gate patterns)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
BACKBONE = "small_cnn"
OPTIONS = {"channels": [16, 32], "feature_dim": 64}
LR = 1e-3
MODES = ("loop", "stacked")
KS = (2, 3, 4, 5)
MIXED = ("75% task-specific", "50% task-specific", "25% task-specific")
TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
WARMUP_STEPS = 3
#: (training rounds, inference rounds); one round times one step / one forward of every variant
ROUNDS = {"quick": (16, 30), "full": (400, 400)}
HEADLINE = ("interrogate_step_over_stl", "dmtg_step_over_k_naive", "stl_step_over_n_naive",
            "compiled_inference_over_stl")
#: the issue's targets: (what, the figure it reads, limit)
TARGETS = {
    "cpu": [("single-task <= 1.0 x (N x naive)", "stl_step_over_n_naive", 1.0),
            ("DMTG <= 1.0 x (K x naive) at K = 2..5", "dmtg_step_over_k_naive", 1.0),
            ("InterroGate <= 1.2 x STL", "interrogate_step_over_stl", 1.2),
            ("compiled inference <= 1.0 x STL for mixed patterns", "compiled_inference_over_stl", 1.0)],
    "cuda": [("single-task <= 0.3 x (N x naive) at N = 8", "stl_step_over_n_naive", 0.3),
             ("DMTG <= 0.5 x (K x naive) at K = 4", "dmtg_step_over_k_naive_at_4", 0.5),
             ("InterroGate <= 2 x naive", "interrogate_step_over_naive", 2.0)],
}


def setting(device: torch.device) -> tuple[tuple[int, ...], int]:
    """(input shape, batch): MultiMNIST-sized on the CPU, CelebA-shaped on CUDA."""
    return ((3, 64, 64), 64) if device.type == "cuda" else ((1, 28, 28), 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of one call of each function over ``rounds`` interleaved rounds (after a warm-up)."""
    for f in fns.values():
        for _ in range(WARMUP_STEPS):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


# ---- networks (each built once from seed 0; every mode trains its own copy of the same weights) ----

def naive_model(task_list: list[Task], shape) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_branched_model(task_list, [[t.name for t in task_list]], shape, BACKBONE, OPTIONS)


def stl_model(task_list: list[Task], shape) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_branched_model(task_list, [[t.name] for t in task_list], shape, BACKBONE, OPTIONS)


def dmtg_model(task_list: list[Task], shape, K: int) -> DMTGModel:
    """K branches with every head, no shared blocks, S spread over the branches (as bench_dmtg's ``_models``)."""
    names = [t.name for t in task_list]
    torch.manual_seed(0)
    net = build_branched_model(task_list, [names] * K, shape, BACKBONE, OPTIONS)
    s = torch.zeros(len(names), K)
    s[torch.arange(len(names)), torch.arange(len(names)) % K] = 3.0
    return DMTGModel(net, names, s, "intended")


def gated_model(task_list: list[Task], shape):
    """InterroGate's gated network (shared stream + one per task), as bench_interrogate's, for ``shape``."""
    torch.manual_seed(0)
    shared = build_backbone(BACKBONE, shape, **OPTIONS)
    branches = {t.name: build_backbone(BACKBONE, shape, **OPTIONS) for t in task_list}
    feat = output_shape(shared, shape)
    heads = {t.name: make_head(t, feat, shape) for t in task_list}
    return build_gated_network(shared, branches, heads)


def held_gated_model(task_list: list[Task], shape, fraction: float):
    """:func:`gated_model` with its gates forced to bench_interrogate's pattern of ``fraction`` task-specific
    gates, at logits ±8 that the gates' optimiser (lr 0.01) cannot flip within the benchmark's steps: a
    step's cost depends on the pattern, and from InterroGate's initial gates (logit 1) the sparsity loss
    closes the first gate after 92 steps here. 50 %: every stream and both directions of every gate formula
    do work (most of a training); 100 % (every gate 1, the start of a training): no task reads the shared
    stream, whose backward pass the loop skips."""
    net = gated_model(task_list, shape)
    g = torch.Generator().manual_seed(0)
    net.set_gates({k: torch.rand(p.alpha.shape, generator=g) < fraction for k, p in net.gate_points().items()},
                  logit=8.0)
    return net


def task_objective(task_list, model):
    return TaskLossObjective(task_list)


def dmtg_objective(task_list, model):
    """The default recipe in an epoch that learns S (after the warm-up epochs that hold it fixed)."""
    opts = DMTGOptions()
    objective = DMTGObjective(task_list, opts)
    objective.on_epoch_start(int(opts.s_warmup_epochs), model)
    return objective


def interrogate_objective(task_list, model):
    return InterroGateObjective(model, task_list, InterroGateOptions(gate_optimizer="adam", gate_lr=0.01))


def in_mode(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    m = copy.deepcopy(model).to(device)
    set_branch_mode(m, mode)
    return m


def step_fn(model, objective, x, y) -> Callable[[], None]:
    """One training step as the trainer takes it: losses (+ the objective's extra loss), backward,
    Adam on the objective's parameter groups, the objective's ``after_step`` (InterroGate's gates)."""
    opt = make_optimizer(TrainConfig(lr=LR), objective.param_groups(model))

    def step() -> None:
        out = objective(model, x, y)
        loss = torch.stack(list(out.losses.values())).sum()
        if out.extra_loss is not None:
            loss = loss + out.extra_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objective.after_step()
    return step


def gate_ops_fn(model, x, device) -> Callable[[], None]:
    """InterroGate's gate selections and mixtures alone, forward and backward, on fresh tensors of the
    shapes one forward pass of ``model`` (a gated network, loop mode) gives them, with the same gate points
    (their α and β take gradients): each gated layer's T own streams and shared stream, selected and (where
    the network mixes them) mixed as the network does it (``GatePoint.select_and_mix``). Gradients are
    returned (``torch.autograd.grad``), as they are passed on to the convolutions in a step, not accumulated."""
    calls: list[tuple[GatePoint, torch.Size, int, bool]] = []
    select_and_mix = GatePoint.select_and_mix

    def record(point, shared, own, need_mix):
        calls.append((point, shared.shape, len(own), need_mix))
        return select_and_mix(point, shared, own, need_mix)

    GatePoint.select_and_mix = record
    try:
        with torch.no_grad():
            model(x)
    finally:
        GatePoint.select_and_mix = select_and_mix
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [[torch.randn(shape, device=device, generator=g, requires_grad=True) for _ in range(n + 1)]
              for _, shape, n, _ in calls]
    # the last layer's β mixes nothing (no shared stream after it): unused leaves are allowed
    leaves = [t for group in inputs for t in group] + [p for point, *_ in calls for p in (point.alpha, point.beta)]
    upstream = [torch.randn(shape, device=device, generator=g)  # every output has its stream's shape
                for (_, shape, n, need_mix) in calls for _ in range(n + need_mix)]

    def run() -> None:
        outputs = []
        for (point, _, _, need_mix), (shared, *own) in zip(calls, inputs):
            mixed, out = point.select_and_mix(shared, own, need_mix)
            outputs += out + ([mixed] if need_mix else [])
        torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)
    return run


def step_losses(model, objective, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The task losses (and extra loss) of one step's forward pass, detached, and the gradients of their sum."""
    torch.manual_seed(1234)  # DMTG's Gumbel draws: the same noise in both modes
    out = objective(model, x, y)
    values = list(out.losses.values()) + ([out.extra_loss] if out.extra_loss is not None else [])
    losses = torch.stack([v.float().reshape(()) for v in values])
    model.zero_grad(set_to_none=True)
    losses.sum().backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach().cpu(), grads


def sanity(name: str, base, make_objective, task_list, x, y, device) -> dict:
    """Losses of one batch in either mode from the same weights (fresh objectives, same RNG state)."""
    losses, grads = {}, {}
    tf32 = torch.backends.cudnn.allow_tf32  # CUDA: compare in float32 (TF32 convolutions round to ~1e-3)
    torch.backends.cudnn.allow_tf32 = False
    try:
        for mode in MODES:
            model = in_mode(base, mode, device)
            losses[mode], grads[mode] = step_losses(model, make_objective(task_list, model), x, y)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    loop, stacked = losses["loop"], losses["stacked"]
    rel = float(((stacked - loop).abs() / loop.abs().clamp_min(1e-12)).max())
    total_rel = float((stacked.sum() - loop.sum()).abs() / loop.sum().abs().clamp_min(1e-12))
    assert grads["loop"].keys() == grads["stacked"].keys()
    grad_rel = max(float((grads["stacked"][n] - g).norm() / g.norm().clamp_min(1e-12))
                   for n, g in grads["loop"].items())
    row = {"network": name, "loop_total_loss": float(loop.sum()), "stacked_total_loss": float(stacked.sum()),
           "max_rel_diff": rel, "total_rel_diff": total_rel, "tolerance": TOLERANCE,
           "grad_max_rel_diff": grad_rel, "grad_tolerance": GRAD_TOLERANCE, "parameters": len(grads["loop"]),
           "ok": rel <= TOLERANCE and grad_rel <= GRAD_TOLERANCE}
    print(f"sanity {name}: loop {row['loop_total_loss']:.7f} stacked {row['stacked_total_loss']:.7f} "
          f"max rel diff {rel:.2e}, gradients {grad_rel:.2e} ({'ok' if row['ok'] else 'ABOVE TOLERANCE'})",
          flush=True)
    return row


class OpCounter(TorchDispatchMode):
    """Counts the operators that do work (not views, not reads of a number into Python): on a GPU each is
    at least one kernel launch, the cost of a launch-bound step."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        if (schema.is_mutable or not any(r.alias_info for r in schema.returns)) \
                and func is not torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object], calls: int = 3) -> int:
    """Operators one call of ``fn`` dispatches (the fewest over ``calls`` calls: DMTG measures its
    attribution every few steps)."""
    counts = []
    for _ in range(calls):
        with OpCounter() as counter:
            fn()
        counts.append(counter.count)
    return min(counts)


def training(task_list, shape, x, y, device, rounds: int) -> tuple[dict, list[dict], dict]:
    """Median step seconds of every network in every mode, the loss sanity checks and the operators
    each step dispatches."""
    bases = {"single_task": (stl_model(task_list, shape), task_objective),
             **{f"dmtg_k{K}": (dmtg_model(task_list, shape, K), dmtg_objective) for K in KS},
             "interrogate": (held_gated_model(task_list, shape, PATTERNS["50% task-specific"]), interrogate_objective),
             "interrogate_start": (held_gated_model(task_list, shape, PATTERNS["all task-specific"]),
                                   interrogate_objective)}
    checks = [sanity(name, *bases[key], task_list, x, y, device)
              for name, key in (("single_task", "single_task"), ("dmtg K=3", "dmtg_k3"), ("interrogate", "interrogate"))]
    naive = naive_model(task_list, shape).to(device)
    fns = {"naive_mtl": step_fn(naive, task_objective(task_list, naive), x, y),
           "interrogate_gate_ops": gate_ops_fn(in_mode(bases["interrogate"][0], "loop", device), x, device)}
    for name, (base, make_objective) in bases.items():
        for mode in MODES:
            model = in_mode(base, mode, device)
            fns[f"{name}@{mode}"] = step_fn(model, make_objective(task_list, model), x, y)
    med = time_interleaved(fns, rounds, device)
    return med, checks, {k: dispatched_ops(f) for k, f in fns.items() if k != "interrogate_gate_ops"}


def weight_layers_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """``model``'s weight layers (every ``Conv2d`` and ``Linear``) alone, each on a copy of the input one
    forward pass of ``model`` gives it: what its matrix products and convolutions cost, without the
    elementwise layers, mixtures, concatenations and gathers between them."""
    calls: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args[0].clone())))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()

    def run() -> None:
        for m, inp in calls:
            m(inp)
    return run


@torch.no_grad()
def inference(task_list, shape, x, device, rounds: int) -> tuple[list[dict], bool]:
    """Compiled InterroGate vs the 8 single-task networks (eval, no grad) for each forced gate pattern."""
    stl_base = stl_model(task_list, shape).eval()
    stl = {mode: in_mode(stl_base, mode, device).eval() for mode in MODES}
    stl_flops = count_flops(stl["loop"], shape)
    gated = gated_model(task_list, shape).to(device).eval()
    compiled: dict[str, dict[str, torch.nn.Module]] = {}
    kept_flops: dict[str, int] = {}
    max_rel_diff: dict[str, float] = {}
    has_mode = False
    for label, frac in PATTERNS.items():
        g = torch.Generator().manual_seed(0)
        gated.set_gates({k: torch.rand(p.alpha.shape, generator=g) < frac for k, p in gated.gate_points().items()})
        net = gated.compile().eval()
        kept_flops[label] = count_flops(gated.compile(kept_only=True), shape)
        want, got = gated(x), net(x)
        max_rel_diff[label] = max(float((want[t] - got[t]).abs().max() / want[t].abs().max().clamp_min(1e-12))
                                  for t in want)
        has_mode = has_mode or any(hasattr(m, "branch_mode") for m in net.modules())
        compiled[label] = {"loop": net}
    modes = MODES if has_mode else ("once",)
    if has_mode:
        compiled = {label: {mode: in_mode(c["loop"], mode, device).eval() for mode in MODES}
                    for label, c in compiled.items()}
    else:
        compiled = {label: {"once": c["loop"]} for label, c in compiled.items()}
    fns: dict[str, Callable[[], object]] = {f"stl@{mode}": (lambda m=m: m(x)) for mode, m in stl.items()}
    fns["stl_layers"] = weight_layers_fn(stl["loop"], x)
    for label, by_mode in compiled.items():
        for mode, net in by_mode.items():
            fns[f"{label}@{mode}"] = (lambda n=net: n(x))
        fns[f"{label}_layers"] = weight_layers_fn(next(iter(by_mode.values())), x)
    med = time_interleaved(fns, rounds, device)
    rows = []
    for label, frac in PATTERNS.items():
        flops = count_flops(next(iter(compiled[label].values())), shape)
        row = {"pattern": label, "task_specific_fraction": frac, "compiled_flops": flops, "stl_flops": stl_flops,
               "flops_ratio": flops / stl_flops, "kept_flops": kept_flops[label],
               "kept_flops_ratio": kept_flops[label] / stl_flops, "max_rel_diff_vs_gated": max_rel_diff[label],
               "stl_ms": {m: 1e3 * med[f"stl@{m}"] for m in MODES},
               # the weight layers alone (no mixture, assembly or elementwise layer), compiled ÷ STL loop
               "weight_layers_ratio": med[f"{label}_layers"] / med["stl_layers"],
               "compiled_ms": {m: 1e3 * med[f"{label}@{m}"] for m in modes}}
        # time ÷ the STL networks in their faster mode, the ones the compiled network replaces (a compiled
        # network without branch_mode has one time for both modes)
        fastest_stl = min(med[f"stl@{m}"] for m in MODES)
        row["time_ratio"] = {m: med[f"{label}@{m if has_mode else 'once'}"] / fastest_stl for m in MODES}
        rows.append(row)
    return rows, has_mode


def summarise(med: dict, infer: list[dict], n_tasks: int) -> dict:
    """Step ms and ratios per mode."""
    naive = med["naive_mtl"]
    out = {}
    for mode in MODES:
        stl = med[f"single_task@{mode}"]
        ig = med[f"interrogate@{mode}"]
        ig_start = med[f"interrogate_start@{mode}"]
        dmtg = {K: med[f"dmtg_k{K}@{mode}"] for K in KS}
        dmtg_ratio = {K: dmtg[K] / (K * naive) for K in KS}
        out[mode] = {
            "step_ms": {"naive_mtl": 1e3 * naive, "single_task": 1e3 * stl, "interrogate": 1e3 * ig,
                        "interrogate_start": 1e3 * ig_start,
                        **{f"dmtg_k{K}": 1e3 * dmtg[K] for K in KS}},
            "stl_step_over_n_naive": stl / (n_tasks * naive),
            "dmtg_step_over_k_naive_by_k": {str(K): r for K, r in dmtg_ratio.items()},
            "dmtg_step_over_k_naive": max(dmtg_ratio.values()),
            "dmtg_step_over_k_naive_at_4": dmtg_ratio[4],
            "interrogate_step_over_stl": ig / stl,
            "interrogate_start_step_over_stl": ig_start / stl,
            # the floor with these ops: T + 1 streams' convolutions and the gate ops alone
            "interrogate_gate_ops_over_stl": med["interrogate_gate_ops"] / stl,
            "interrogate_floor_over_stl": (n_tasks + 1) / n_tasks + med["interrogate_gate_ops"] / stl,
            "interrogate_step_over_naive": ig / naive,
            "compiled_inference_over_stl": max(r["time_ratio"][mode] for r in infer if r["pattern"] in MIXED),
        }
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(result: dict) -> str:
    s, per = result["setup"], result["by_mode"]
    dev = s["device"]
    where = s["device_name"] if dev == "cuda" else f"CPU, {s['threads']} thread"
    ms = {m: per[m]["step_ms"] for m in MODES}
    lines = [f"# Branches in a loop vs stacked (one vmapped call): {where}", "",
             f"Inputs {'x'.join(map(str, s['input']))}, batch {s['batch']}, {s['tasks']} binary tasks, {s['backbone']} "
             f"{json.dumps(s['backbone_options'])}, Adam lr {s['lr']}; medians of {s['train_rounds']} interleaved "
             f"training rounds and {s['inference_rounds']} inference rounds; torch {s['torch']}"
             f"{'; quick run' if s['quick'] else ''}. `train.branches=auto` picks **{result['mode']}** here.", "",
             f"## The issue's targets on {'the GPU' if dev == 'cuda' else 'the CPU'}", "",
             "| target | loop | stacked |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['value']['loop']:.2f} ({'met' if t['met']['loop'] else 'missed'}) | "
                     f"{t['value']['stacked']:.2f} ({'met' if t['met']['stacked'] else 'missed'}) |")
    gpu = dev == "cuda"
    lines += ["", f"## Naive MTL step (one branch, nothing to stack): {ms['loop']['naive_mtl']:.2f} ms", "",
              "## Single-task step, N = 8 branches (target: "
              + ("<= 0.3 x (N x naive) at N = 8 on the GPU" if gpu else "<= 1.0 x (N x naive) on the CPU") + ")", "",
              "| | loop | stacked |", "|---|---|---|",
              f"| step ms | {ms['loop']['single_task']:.2f} | {ms['stacked']['single_task']:.2f} |",
              f"| ÷ (8 x naive) | {per['loop']['stl_step_over_n_naive']:.2f} | "
              f"{per['stacked']['stl_step_over_n_naive']:.2f} |", "",
              "## DMTG step, S learning (target: "
              + ("<= 0.5 x (K x naive) at K = 4 on the GPU" if gpu else "<= 1.0 x (K x naive) at K = 2..5 on the CPU")
              + ")", "",
              "| K | loop ms | stacked ms | loop ÷ (K x naive) | stacked ÷ (K x naive) |", "|---|---|---|---|---|"]
    for K in KS:
        lines.append(f"| {K} | {ms['loop'][f'dmtg_k{K}']:.2f} | {ms['stacked'][f'dmtg_k{K}']:.2f} | "
                     f"{per['loop']['dmtg_step_over_k_naive_by_k'][str(K)]:.2f} | "
                     f"{per['stacked']['dmtg_step_over_k_naive_by_k'][str(K)]:.2f} |")
    lines += [f"| largest | | | {per['loop']['dmtg_step_over_k_naive']:.2f} | "
              f"{per['stacked']['dmtg_step_over_k_naive']:.2f} |", "",
              "## InterroGate training step, T + 1 = 9 streams (target: "
              + ("<= 2 x naive on the GPU" if gpu else "<= 1.2 x STL on the CPU") + ")", "",
              "| | loop | stacked |", "|---|---|---|",
              f"| step ms | {ms['loop']['interrogate']:.2f} | {ms['stacked']['interrogate']:.2f} |",
              f"| ÷ STL (same mode) | {per['loop']['interrogate_step_over_stl']:.2f} | "
              f"{per['stacked']['interrogate_step_over_stl']:.2f} |",
              f"| ÷ naive | {per['loop']['interrogate_step_over_naive']:.2f} | "
              f"{per['stacked']['interrogate_step_over_naive']:.2f} |",
              *([f"| every gate 1 (the start of a training): step ms | {ms['loop']['interrogate_start']:.2f} | "
                 f"{ms['stacked']['interrogate_start']:.2f} |",
                 f"| every gate 1: ÷ STL | {per['loop']['interrogate_start_step_over_stl']:.2f} "
                 f"| {per['stacked']['interrogate_start_step_over_stl']:.2f} |"]
                if "interrogate_start" in ms["loop"] else ["| every gate 1 | not measured | |"]),
              f"| gate selections and mixtures alone ÷ STL | {per['loop']['interrogate_gate_ops_over_stl']:.2f} | "
              f"{per['stacked']['interrogate_gate_ops_over_stl']:.2f} |",
              f"| floor with these ops: (T + 1)/T + gate ops ÷ STL | {per['loop']['interrogate_floor_over_stl']:.2f} | "
              f"{per['stacked']['interrogate_floor_over_stl']:.2f} |", "",
              "A step's cost depends on the gates, which are held for the timing (logits ±8): the step (the target's "
              "figure) with half the gates task-specific, where every stream back-propagates, as for most of a "
              "training; beside it every gate 1, the start of a training (from the initial logit 1 the first gate closes "
              "after 92 steps in this setting), where no task reads the shared stream and the loop skips "
              "its backward pass. The gate ops are timed once, with half the gates task-specific, on the loop's "
              "activation shapes; each mode divides them by its own STL step.", ""]
    if "ops_per_step" in result:
        ops = result["ops_per_step"]
        lines += ["## Operators dispatched per training step", "",
                  "Operators that do work (views and reads of a number excluded), counted on this device: on a GPU "
                  "each is at least one kernel launch, and these small steps are bound by launches there.", "",
                  "| network | loop | stacked |", "|---|---|---|", f"| naive MTL | {ops['naive_mtl']} | |"]
        lines += [f"| {label} | {ops[f'{key}@loop']} | {ops[f'{key}@stacked']} |" for label, key in
                  [("single-task, N = 8", "single_task"), *((f"DMTG K = {K}", f"dmtg_k{K}") for K in KS),
                   ("InterroGate, T + 1 = 9", "interrogate"), ("InterroGate, every gate 1",
                                                               "interrogate_start")] if f"{key}@loop" in ops]
        lines.append("")
    lines += ["## Compiled InterroGate inference vs the 8 single-task networks (target: <= 1.0 x STL for mixed "
              "patterns" + (", a CPU target" if gpu else "") + ")", "",
              "The compiled network " + ("has a `branch_mode` and is timed in both modes."
                                         if result["compiled_has_branch_mode"] else
                                         "has no `branch_mode`: timed once.") + " Time ÷ STL divides by the STL "
              "networks' faster mode. FLOPs ÷ STL: the kept channels alone (the pruned network the paper counts) / "
              "what the compiled network computes (first layer merged, copies widened to aligned widths). Its outputs "
              "vs the gated network's: largest relative difference. Weight layers alone: every Conv2d and Linear of "
              "the compiled network, each run on the input a forward pass gave it, ÷ the same for the STL networks "
              "(loop): the time its convolutions and matrix products take at their widths, before any mixture, "
              "concatenation, gather or elementwise layer.",
              "", "| gates | FLOPs ÷ STL (kept / computed) | weight layers alone ÷ STL | compiled ms (loop / stacked) | "
              "STL ms (loop / stacked) | time ÷ STL, loop | time ÷ STL, stacked | outputs vs gated |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["inference"]:
        cm = r["compiled_ms"]
        compiled_ms = f"{cm['once']:.2f}" if "once" in cm else f"{cm['loop']:.2f} / {cm['stacked']:.2f}"
        layers = f"{r['weight_layers_ratio']:.2f}" if "weight_layers_ratio" in r else "not measured"
        lines.append(f"| {r['pattern']} | {r['kept_flops_ratio']:.3f} / {r['flops_ratio']:.3f} | {layers} | "
                     f"{compiled_ms} | {r['stl_ms']['loop']:.2f} / {r['stl_ms']['stacked']:.2f} | "
                     f"{r['time_ratio']['loop']:.2f} | {r['time_ratio']['stacked']:.2f} | "
                     f"{r['max_rel_diff_vs_gated']:.1e} |")
    lines += [f"| largest over the mixed patterns | | | | | {per['loop']['compiled_inference_over_stl']:.2f} | "
              f"{per['stacked']['compiled_inference_over_stl']:.2f} | |", "",
              f"## Sanity: one batch's losses and gradients, stacked vs loop from the same weights (relative "
              f"difference <= {TOLERANCE:g} for the losses, <= {GRAD_TOLERANCE:g} for each parameter's gradient)", "",
              "| network | loop total loss | stacked total loss | losses: max relative difference | "
              "gradients: max relative difference | ok |", "|---|---|---|---|---|---|"]
    for c in result["sanity"]:
        grad = f"{c['grad_max_rel_diff']:.1e}" if "grad_max_rel_diff" in c else "not measured"
        lines.append(f"| {c['network']} | {c['loop_total_loss']:.6f} | {c['stacked_total_loss']:.6f} | "
                     f"{c['max_rel_diff']:.1e} | {grad} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def json_stem(device_type: str, quick: bool) -> str:
    """``branches`` on the CPU, ``branches_cuda`` on CUDA; ``_quick`` for a quick run."""
    return "branches" + ("_cuda" if device_type == "cuda" else "") + ("_quick" if quick else "")


def write_markdown(quick: bool) -> str:
    """branches.md (or branches_quick.md): the tables of every device's JSON that is there, the CPU first."""
    parts = [markdown(json.loads(path.read_text())) for dev in ("cpu", "cuda")
             if (path := OUT / f"{json_stem(dev, quick)}.json").exists()]
    text = "\n".join(parts)
    atomic_write_text(OUT / f"branches{'_quick' if quick else ''}.md", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="few rounds (under a minute); writes branches[_cuda]_quick.json and branches_quick.md")
    ap.add_argument("--rounds", type=int, default=None, help="training and inference rounds (default: 400, quick 16 / 30)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, batch = setting(device)
    train_rounds, infer_rounds = ROUNDS["quick" if args.quick else "full"] if args.rounds is None else (args.rounds,) * 2
    task_list = tasks()
    torch.manual_seed(0)
    x = torch.rand(batch, *shape, device=device)
    y = {t.name: torch.randint(0, 2, (batch,), device=device) for t in task_list}
    started = time.perf_counter()
    med, checks, ops = training(task_list, shape, x, y, device, train_rounds)
    infer, has_mode = inference(task_list, shape, x, device, infer_rounds)
    per = summarise(med, infer, len(task_list))
    auto = resolve_branch_mode("auto", device)
    targets = [{"target": label, "reads": key, "limit": limit, "value": {m: per[m][key] for m in MODES},
                "met": {m: per[m][key] <= limit for m in MODES}} for label, key, limit in TARGETS[device.type]]
    result = {
        "setup": {"device": device.type,
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                  "input": list(shape), "batch": batch, "tasks": len(task_list), "backbone": BACKBONE,
                  "backbone_options": OPTIONS, "shared_blocks": 0, "lr": LR, "threads": torch.get_num_threads(),
                  "train_rounds": train_rounds, "inference_rounds": infer_rounds, "warmup_steps": WARMUP_STEPS,
                  "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
                  "platform": platform.platform(), "git_revision": git_revision(),
                  # glibc's malloc settings, if the run set any (README: they can move the compiled network's time)
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "seconds": round(time.perf_counter() - started, 1)},
        "mode": auto, "by_mode": per, "median_step_ms": {k: 1e3 * v for k, v in med.items()}, "ops_per_step": ops,
        "inference": infer, "compiled_has_branch_mode": has_mode, "sanity": checks, "targets": targets}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"{json_stem(device.type, args.quick)}.json", result, strict=True)
    write_markdown(args.quick)
    print(markdown(result), flush=True)
    headline = {k: per[auto][k] for k in HEADLINE}
    print(json.dumps({**headline, "mode": auto, "device": device.type,
                      "by_mode": {m: {k: per[m][k] for k in HEADLINE} for m in MODES}}))


if __name__ == "__main__":
    main()
