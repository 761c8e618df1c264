"""Time overhead of logging the Mao et al. diagnostics during naive-MTL training.

Small MLP and CNN backbones, 8 binary tasks, one shared trunk, plain SGD. In one process, blocks
of training steps run *interleaved*: without the callback, with it at ``level="param"`` (GDS/GMS
on shared-parameter gradients + FD) and at ``level="feature"`` (GDS/GMS on feature gradients +
FD), all measured every 10 steps. Block order rotates each round so drift in machine load hits
every variant alike. Each round gives one overhead ratio per variant (its block time over the
round's no-callback block); the median over rounds is reported, from process CPU time (primary:
torch runs on one thread, and CPU time is less disturbed by other jobs on a shared machine) and
from wall time. Target: <= 10 % overhead.

Beside the overhead, the reverse passes the measures cannot avoid are timed alone (the "floor"):
at the param level T single-task passes through the trunk (exact per-task gradients of the
shared parameters need one each), at the feature level one pass of all T losses through the heads
down to the features. And the ways of getting the T x P per-task gradients are timed against each
other: one pass per task (loop), one vmap-batched pass (``is_grads_batched=True``), and, at the
feature level, one pass with per-task hooks (what the code uses when the heads are disjoint).

Writes benchmarks/results/diagnostics.json and diagnostics.md.

    python benchmarks/bench_diagnostics.py [--rounds 61] [--steps 20] [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from taskgrouping.balancing.task_gradients import feature_gradients_one_pass, task_gradients_into
from taskgrouping.diagnostics import DiagnosticsCallback
from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task

N_TASKS = 8
EVERY = 10
BATCH = 128
TARGET = 0.10
SETUPS = {
    "mlp": {"input_shape": (64,), "backbone_options": {"widths": (256, 256)}},
    "small_cnn": {"input_shape": (3, 32, 32), "backbone_options": {"channels": (16, 32), "feature_dim": 64}},
}
LEVELS = ("param", "feature")
VARIANTS = ("none", "param", "feature", "floor_param", "floor_feature")


def make_data(input_shape: tuple[int, ...], n_batches: int, seed: int) -> list[tuple[torch.Tensor, dict]]:
    """Random inputs labelled by random linear teachers (one per task), so the tasks are learnable."""
    g = torch.Generator().manual_seed(seed)
    d = 1
    for s in input_shape:
        d *= s
    teachers = torch.randn(N_TASKS, d, generator=g)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(BATCH, *input_shape, generator=g)
        logits = x.reshape(BATCH, -1) @ teachers.T
        batches.append((x, {f"t{i}": (logits[:, i] > 0).long() for i in range(N_TASKS)}))
    return batches


class FloorPasses:
    """Only the reverse passes that exact measures at ``level`` cannot avoid, results discarded.

    param: one pass per task to the shared parameters and the features (as the callback does);
    feature: one pass of all task losses through the heads to the features.
    """

    def __init__(self, every: int, level: str) -> None:
        self.every, self.level = every, level

    def measure(self, step: int, losses: dict, shared: list, feats: list) -> bool | None:
        if step % self.every:
            return None
        if self.level == "param":
            for loss in losses.values():
                torch.autograd.grad(loss, shared + feats, retain_graph=True)
        else:
            torch.autograd.grad(list(losses.values()), feats, retain_graph=True)
        return True


def run_block(model, opt, tasks, batches, callback: DiagnosticsCallback | FloorPasses | None, step0: int,
              direct: list[float] | None = None) -> tuple[float, float]:
    """Train on ``batches``; return (CPU seconds, wall seconds) per step. The CPU seconds spent in
    each ``measure`` call that measured are appended to ``direct``."""
    shared = model.shared_parameters()
    c0, t0 = time.process_time(), time.perf_counter()
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        preds, feats = model.forward_heads(x)
        losses = {t.name: t.loss(preds[(0, t.name)], y[t.name]) for t in tasks}
        if callback is not None:
            c = time.process_time()
            if callback.measure(step0 + i, losses, shared, list(feats.values())) is not None and direct is not None:
                direct.append(time.process_time() - c)
        torch.stack(list(losses.values())).sum().backward()
        opt.step()
    n = len(batches)
    return (time.process_time() - c0) / n, (time.perf_counter() - t0) / n


def _cpu_ms(fn) -> float:
    c0 = time.process_time()
    fn()
    return (time.process_time() - c0) * 1e3


def _vmap_gradients(out: torch.Tensor, losses: dict, inputs: list[torch.Tensor]) -> None:
    """The T x P per-task gradients from one vmap-batched reverse pass (identity grad_outputs)."""
    stacked = torch.stack([loss.reshape(()) for loss in losses.values()])
    eye = torch.eye(len(losses), dtype=stacked.dtype)
    grads = torch.autograd.grad(stacked, inputs, eye, retain_graph=True, is_grads_batched=True,
                                allow_unused=True, materialize_grads=True)
    torch.cat([g.reshape(len(losses), -1) for g in grads], dim=1, out=out)


def gradient_methods(model, tasks, batches, reps: int) -> dict:
    """CPU ms per measurement of each way of getting the T x P per-task gradients, by level.

    Every repetition runs a fresh forward pass and then each method once, in rotating order; each
    method writes into its own preallocated T x P buffer.
    """
    shared = model.shared_parameters()
    times: dict[str, list[float]] = {}
    buffers: dict[str, torch.Tensor] = {}
    for r in range(reps + 1):  # the first repetition warms up and is dropped
        x, y = batches[r % len(batches)]
        preds, feats = model.forward_heads(x)
        feats = list(feats.values())
        losses = {t.name: t.loss(preds[(0, t.name)], y[t.name]) for t in tasks}
        runs = {}
        for level, wrt in (("param", shared + feats), ("feature", feats)):
            runs[f"{level}/loop"] = lambda wrt=wrt, key=f"{level}/loop": task_gradients_into(
                _buffer(buffers, key, len(tasks), wrt), losses, wrt, True)
            runs[f"{level}/vmap"] = lambda wrt=wrt, key=f"{level}/vmap": _vmap_gradients(
                _buffer(buffers, key, len(tasks), wrt), losses, wrt)
        runs["feature/one_pass"] = lambda: feature_gradients_one_pass(
            _buffer(buffers, "feature/one_pass", len(tasks), feats), losses, feats)
        keys = list(runs)
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            ms = _cpu_ms(runs[key])
            if r:
                times.setdefault(key, []).append(ms)
    return {level: {k.split("/")[1]: round(statistics.median(v), 3) for k, v in times.items()
                    if k.startswith(level + "/")} for level in LEVELS}


def _buffer(buffers: dict, key: str, rows: int, wrt: list[torch.Tensor]) -> torch.Tensor:
    if key not in buffers:
        buffers[key] = torch.empty(rows, sum(t.numel() for t in wrt))
    return buffers[key]


def bench(name: str, rounds: int, steps: int, reps: int) -> dict:
    setup = SETUPS[name]
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "binary") for i in range(N_TASKS)]
    model = build_branched_model(tasks, [[t.name for t in tasks]], setup["input_shape"], backbone=name,
                                 backbone_options=setup["backbone_options"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = make_data(setup["input_shape"], steps, seed=1)
    callbacks = {"none": None, "param": DiagnosticsCallback(every=EVERY, level="param"),
                 "feature": DiagnosticsCallback(every=EVERY, level="feature"),
                 "floor_param": FloorPasses(EVERY, "param"), "floor_feature": FloorPasses(EVERY, "feature")}
    for v in VARIANTS[1:]:  # warm-up of every code path
        run_block(model, opt, tasks, batches[:10], callbacks[v], 0)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    direct: dict[str, list[float]] = {v: [] for v in VARIANTS}
    step = 0
    for r in range(rounds):
        k = r % len(VARIANTS)
        order = VARIANTS[k:] + VARIANTS[:k]
        for v in order:
            c, w = run_block(model, opt, tasks, batches, callbacks[v], step, direct[v])
            cpu[v].append(c)
            wall[v].append(w)
            step += steps
    out = {"backbone": name, "shared_params": sum(p.numel() for p in model.shared_parameters()),
           "cpu_ms_per_step": {v: round(statistics.median(cpu[v]) * 1e3, 3) for v in VARIANTS},
           "wall_ms_per_step": {v: round(statistics.median(wall[v]) * 1e3, 3) for v in VARIANTS},
           "overhead_cpu": {}, "overhead_wall": {}, "cpu_ms_per_measurement": {},
           "direct_cpu_ms_per_measurement": {}, "overhead_direct_cpu": {}, "every_for_target": {},
           "last_measures": {}}
    for v in VARIANTS[1:]:
        ratio_cpu = statistics.median(a / b for a, b in zip(cpu[v], cpu["none"])) - 1
        ratio_wall = statistics.median(a / b for a, b in zip(wall[v], wall["none"])) - 1
        out["overhead_cpu"][v] = round(ratio_cpu, 4)
        out["overhead_wall"][v] = round(ratio_wall, 4)
        per_measure = ratio_cpu * statistics.median(cpu["none"]) * EVERY
        out["cpu_ms_per_measurement"][v] = round(per_measure * 1e3, 3)
        direct_ms = statistics.median(direct[v]) * 1e3
        out["direct_cpu_ms_per_measurement"][v] = round(direct_ms, 3)
        out["overhead_direct_cpu"][v] = round(direct_ms / (EVERY * statistics.median(cpu["none"]) * 1e3), 4)
        # smallest logging interval that keeps the CPU overhead at or under the target
        out["every_for_target"][v] = max(1, math.ceil(EVERY * ratio_cpu / TARGET))
        if v in LEVELS:
            out["last_measures"][v] = {k: round(float(x), 4) for k, x in callbacks[v].history[-1].items()}
    out["gradient_methods_cpu_ms_per_measurement"] = gradient_methods(model, tasks, batches, reps)
    out["raw_cpu_ms_per_step"] = {v: [round(t * 1e3, 3) for t in ts] for v, ts in cpu.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=61)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed block (a multiple of 10)")
    ap.add_argument("--reps", type=int, default=15, help="repetitions of the floor and gradient-method timings")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if args.steps < EVERY or args.steps % EVERY:
        raise ValueError(f"--steps must be a positive multiple of {EVERY} (every block then measures equally often), "
                         f"got {args.steps}")
    torch.set_num_threads(1)
    results = [bench(name, args.rounds, args.steps, args.reps) for name in SETUPS]
    meta = {"n_tasks": N_TASKS, "every": EVERY, "batch": BATCH, "rounds": args.rounds, "steps_per_block": args.steps,
            "reps": args.reps, "target_overhead": TARGET, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(),
            "timing": "median over rounds of the per-round time ratio (variant block / no-callback block), "
                      "interleaved blocks in one process; CPU = process_time, wall = perf_counter; direct = median "
                      "process_time inside the measuring callback calls"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnostics.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# Diagnostics callback overhead",
        "",
        f"Naive MTL, {N_TASKS} binary tasks, batch {BATCH}, SGD, CPU with 1 thread; GDS+GMS+FD logged every "
        f"{EVERY} steps. {args.rounds} rounds of interleaved {args.steps}-step blocks; overhead = median over "
        f"rounds of the block-time ratio to the no-callback block. Target overhead <= {TARGET:.0%}.",
        "",
        "| backbone | shared params | level | CPU ms/step (none) | CPU ms/step (with) | overhead (CPU) "
        "| overhead (wall) | ms per measurement (direct) | overhead (direct) | floor ms per measurement (direct) "
        "| floor overhead (direct) | floor overhead (CPU) | every k for <= 10 % |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for v in LEVELS:
            f = f"floor_{v}"
            lines.append(f"| {r['backbone']} | {r['shared_params']:,} | {v} | {r['cpu_ms_per_step']['none']:.2f} | "
                         f"{r['cpu_ms_per_step'][v]:.2f} | {r['overhead_cpu'][v]:+.1%} | "
                         f"{r['overhead_wall'][v]:+.1%} | {r['direct_cpu_ms_per_measurement'][v]:.2f} | "
                         f"{r['overhead_direct_cpu'][v]:+.1%} | {r['direct_cpu_ms_per_measurement'][f]:.2f} | "
                         f"{r['overhead_direct_cpu'][f]:+.1%} | {r['overhead_cpu'][f]:+.1%} | "
                         f"{r['every_for_target'][v]} |")
    lines += [
        "",
        "Columns: *CPU ms/step* are medians over rounds of the process CPU time per training step (forward, "
        "loss, backward, SGD step), without the callback and with it; *overhead (CPU)* is the median over rounds "
        "of the per-round ratio of the two, minus 1 (and *overhead (wall)* the same from wall time): it includes "
        "what a measurement costs the steps around it (caches, allocator), but on a shared machine it carries "
        "a few points of noise. *ms per measurement (direct)* is the median CPU time inside the callback's "
        f"measuring calls, and *overhead (direct)* = that / ({EVERY} x no-callback step time), since the "
        f"callback measures once every {EVERY} steps: less noisy, but blind to effects on the surrounding "
        "steps. *floor* columns are the same numbers for a stand-in callback that runs only the reverse passes "
        "any exact computation of the measures needs (results discarded), timed in the same interleaved "
        "rounds. *every k* is the smallest logging interval that would keep *overhead (CPU)* at or under the "
        "target.",
        "",
        f"`param` differentiates every task loss through the shared trunk: exact per-task gradients of the shared "
        f"parameters need one reverse pass per task, so its floor is {N_TASKS} single-task passes (to the shared "
        "parameters and the features, as the callback does) and no implementation can log the param level every "
        f"{EVERY} steps for much less than that. `feature` stops at the shared features: its floor is one "
        "reverse pass of all task losses through the heads. The remainder above the floor is the Gram matrix, the "
        "entropy pass for FD and Python overhead, plus what the measurement costs the training step around it "
        "(caches).",
        "",
        f"Per-task gradients alone, CPU ms per measurement (median of {args.reps} repetitions, each on a fresh "
        "forward pass): one reverse pass per task (`loop`), one vmap-batched pass with identity grad_outputs "
        "(`vmap`, `torch.autograd.grad(..., is_grads_batched=True)`), and at the feature level one pass of the "
        "summed losses with hooks recording each task's share (`one_pass`). The code uses `loop` at the param "
        "level and `one_pass` at the feature level (falling back to `loop` when tasks share graph nodes above "
        "the features).",
        "",
        "| backbone | level | loop | vmap | one_pass |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        for v in LEVELS:
            m = r["gradient_methods_cpu_ms_per_measurement"][v]
            one = f"{m['one_pass']:.2f}" if "one_pass" in m else "-"
            lines.append(f"| {r['backbone']} | {v} | {m['loop']:.2f} | {m['vmap']:.2f} | {one} |")
    (args.out / "diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
