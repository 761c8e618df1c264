"""Time overhead of logging the Mao et al. diagnostics during naive-MTL training.

Small MLP and CNN backbones, 8 binary tasks, one shared trunk, plain SGD. In one process, blocks
of training steps run *interleaved*: without the callback, with it at ``level="param"`` (GDS/GMS
on shared-parameter gradients + FD) and at ``level="feature"`` (GDS/GMS on feature gradients +
FD), all measured every 10 steps. Block order rotates each round so drift in machine load hits
every variant alike. Each round gives one overhead ratio per variant (its block time over the
round's no-callback block); the median over rounds is reported, from process CPU time (primary:
torch runs on one thread, and CPU time is less disturbed by other jobs on a shared machine) and
from wall time. Target: <= 10 % overhead.

Writes benchmarks/results/diagnostics.json and diagnostics.md.

    python benchmarks/bench_diagnostics.py [--rounds 15] [--steps 20]
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
VARIANTS = ("none", "param", "feature")


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


def run_block(model, opt, tasks, batches, callback: DiagnosticsCallback | None, step0: int,
              ) -> tuple[float, float]:
    """Train on ``batches``; return (CPU seconds, wall seconds) per step."""
    shared = model.shared_parameters()
    c0, t0 = time.process_time(), time.perf_counter()
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        preds, feats = model.forward_heads(x)
        losses = {t.name: t.loss(preds[(0, t.name)], y[t.name]) for t in tasks}
        if callback is not None:
            callback.measure(step0 + i, losses, shared, list(feats.values()))
        torch.stack(list(losses.values())).sum().backward()
        opt.step()
    n = len(batches)
    return (time.process_time() - c0) / n, (time.perf_counter() - t0) / n


def bench(name: str, rounds: int, steps: int) -> dict:
    setup = SETUPS[name]
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "binary") for i in range(N_TASKS)]
    model = build_branched_model(tasks, [[t.name for t in tasks]], setup["input_shape"], backbone=name,
                                 backbone_options=setup["backbone_options"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = make_data(setup["input_shape"], steps, seed=1)
    callbacks = {"none": None, "param": DiagnosticsCallback(every=EVERY, level="param"),
                 "feature": DiagnosticsCallback(every=EVERY, level="feature")}
    run_block(model, opt, tasks, batches[:10], callbacks["param"], 0)  # warm-up of every code path
    run_block(model, opt, tasks, batches[:10], callbacks["feature"], 0)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    step = 0
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            c, w = run_block(model, opt, tasks, batches, callbacks[v], step)
            cpu[v].append(c)
            wall[v].append(w)
            step += steps
    out = {"backbone": name, "shared_params": sum(p.numel() for p in model.shared_parameters()),
           "cpu_ms_per_step": {v: round(statistics.median(cpu[v]) * 1e3, 3) for v in VARIANTS},
           "wall_ms_per_step": {v: round(statistics.median(wall[v]) * 1e3, 3) for v in VARIANTS},
           "overhead_cpu": {}, "overhead_wall": {}, "cpu_ms_per_measurement": {}, "every_for_target": {},
           "last_measures": {}}
    for v in VARIANTS[1:]:
        ratio_cpu = statistics.median(a / b for a, b in zip(cpu[v], cpu["none"])) - 1
        ratio_wall = statistics.median(a / b for a, b in zip(wall[v], wall["none"])) - 1
        out["overhead_cpu"][v] = round(ratio_cpu, 4)
        out["overhead_wall"][v] = round(ratio_wall, 4)
        per_measure = ratio_cpu * statistics.median(cpu["none"]) * EVERY
        out["cpu_ms_per_measurement"][v] = round(per_measure * 1e3, 3)
        # smallest logging interval that keeps the CPU overhead at or under the target
        out["every_for_target"][v] = max(1, math.ceil(EVERY * ratio_cpu / TARGET))
        out["last_measures"][v] = {k: round(float(x), 4) for k, x in callbacks[v].history[-1].items()}
    out["raw_cpu_ms_per_step"] = {v: [round(t * 1e3, 3) for t in ts] for v, ts in cpu.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed block (a multiple of 10)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if args.steps < EVERY or args.steps % EVERY:
        raise ValueError(f"--steps must be a positive multiple of {EVERY} (every block then measures equally often), "
                         f"got {args.steps}")
    torch.set_num_threads(1)
    results = [bench(name, args.rounds, args.steps) for name in SETUPS]
    meta = {"n_tasks": N_TASKS, "every": EVERY, "batch": BATCH, "rounds": args.rounds, "steps_per_block": args.steps,
            "target_overhead": TARGET, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(),
            "timing": "median over rounds of the per-round time ratio (variant block / no-callback block), "
                      "interleaved blocks in one process; CPU = process_time, wall = perf_counter"}
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
        "| overhead (wall) | CPU ms per measurement | every k for <= 10 % |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for v in ("param", "feature"):
            lines.append(f"| {r['backbone']} | {r['shared_params']:,} | {v} | {r['cpu_ms_per_step']['none']:.2f} | "
                         f"{r['cpu_ms_per_step'][v]:.2f} | {r['overhead_cpu'][v]:+.1%} | "
                         f"{r['overhead_wall'][v]:+.1%} | {r['cpu_ms_per_measurement'][v]:.1f} | "
                         f"{r['every_for_target'][v]} |")
    lines += ["", "`param` differentiates every task loss through the shared trunk (T backward passes per "
              "measurement); `feature` stops at the shared features (heads only)."]
    (args.out / "diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
