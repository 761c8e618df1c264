"""Step time of every balancer relative to equal weighting (EW), parameter- and feature-level.

Setups: the package's ``small_cnn`` backbone (two strided 3x3 convs, then a linear layer to a
feature vector) shared by 8 binary tasks (MultiMNIST-like: random 1x36x36 inputs, labels from
random linear teachers), one branch, SGD, torch on one thread. ``small``: 16/32 channels, 64
features, batch 128, every balancer at both levels. ``wide``: 32/64 channels, 128 features, batch
256, feature level only (parameter level would take minutes here) - it shows how the fixed
per-step cost of the aggregators shrinks relative to a larger step. A step is zero_grad + forward
+ per-task losses + ``balancer.backward`` + optimiser step.

In one process, blocks of steps run *interleaved*: each round times one block per variant, the
block order rotating every round so drifts in machine load hit all variants alike. Each round gives
one ratio per variant (its block time over the round's EW block); the median over rounds is
reported, from process CPU time (primary: one thread, and CPU time is less disturbed by other jobs
on a shared machine) and from wall time. Targets (Mao et al. 2024's motivation for the surrogate):
feature-level <= 1.2 x EW, parameter-level <= T x EW (T = 8 backward passes).

Writes benchmarks/results/balancers.json and balancers.md.

    python benchmarks/bench_balancers.py [--rounds 7] [--steps 4] [--setups small,wide]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from taskgrouping.balancing.base import get_balancer
from taskgrouping.balancing.methods import GRADIENT_METHODS, LOSS_WEIGHTING_METHODS
from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task

N_TASKS = 8
INPUT = (1, 36, 36)
SETUPS = {
    "small": {"channels": (16, 32), "feature_dim": 64, "batch": 128, "levels": ("param", "feature")},
    "wide": {"channels": (32, 64), "feature_dim": 128, "batch": 256, "levels": ("feature",)},
}
FEATURE_TARGET = 1.2
PARAM_TARGET = float(N_TASKS)
NAMES = [f"t{i}" for i in range(N_TASKS)]
ALWAYS_FEATURE = {"mgda_ub", "aligned_mtl_ub"}
NEEDS_TASKS = {"uw", "gradnorm", "imtl"}


def variants(levels: tuple[str, ...]) -> list[tuple[str, str]]:
    """EW at parameter level (the reference) first, then every balancer at the requested levels."""
    out = [("ew", "param")]
    for name in GRADIENT_METHODS:
        if "param" in levels and name != "ew" and name not in ALWAYS_FEATURE:
            out.append((name, "param"))
        if "feature" in levels:
            out.append((name, "feature"))
    if "param" in levels:
        out += [(name, "param") for name in LOSS_WEIGHTING_METHODS]
    return out


def make_balancer(name: str, level: str):
    options: dict = {}
    if name in NEEDS_TASKS:
        options["tasks"] = NAMES
    if name in GRADIENT_METHODS and name not in ALWAYS_FEATURE:
        options["feature_level"] = level == "feature"
    return get_balancer(name, **options)


def make_data(n_batches: int, batch: int, seed: int) -> list[tuple[torch.Tensor, dict]]:
    g = torch.Generator().manual_seed(seed)
    d = INPUT[0] * INPUT[1] * INPUT[2]
    teachers = torch.randn(N_TASKS, d, generator=g)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, *INPUT, generator=g)
        logits = x.reshape(batch, -1) @ teachers.T
        batches.append((x, {n: (logits[:, i] > 0).long() for i, n in enumerate(NAMES)}))
    return batches


class Setup:
    """One model + optimiser + balancer per variant, so stateful balancers keep their state."""

    def __init__(self, name: str, level: str, tasks: list[Task], spec: dict) -> None:
        torch.manual_seed(0)
        self.tasks = tasks
        self.model = build_branched_model(tasks, [NAMES], INPUT, backbone="small_cnn", backbone_options={
            "channels": spec["channels"], "feature_dim": spec["feature_dim"]})
        self.balancer = make_balancer(name, level)
        self.opt = torch.optim.SGD(list(self.model.parameters()) + self.balancer.extra_parameters(), lr=0.01)
        self.shared = self.model.shared_parameters()

    def step(self, x: torch.Tensor, targets: dict) -> None:
        self.opt.zero_grad(set_to_none=True)
        preds, feats = self.model.forward_heads(x)
        losses = {t.name: t.loss(preds[(0, t.name)], targets[t.name]) for t in self.tasks}
        self.balancer.backward(losses, self.shared, list(feats.values()))
        self.opt.step()


def run_block(setup: Setup, batches, steps: int) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        setup.step(x, y)
    return time.process_time() - c0, time.perf_counter() - w0


def measure(setup_name: str, rounds: int, steps: int, tasks: list[Task]) -> list[dict]:
    spec = SETUPS[setup_name]
    batches = make_data(steps, spec["batch"], seed=1)
    keys = variants(spec["levels"])
    setups = {k: Setup(*k, tasks, spec) for k in keys}
    for s in setups.values():  # warm-up (allocations, lazy imports, solver set-up)
        run_block(s, batches, 2)
    ratios: dict[tuple[str, str], dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in keys}
    per_step: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        order = keys[shift:] + keys[:shift]
        times = {k: run_block(setups[k], batches, steps) for k in order}
        base_cpu, base_wall = times[("ew", "param")]
        for k, (cpu, wall) in times.items():
            ratios[k]["cpu"].append(cpu / base_cpu)
            ratios[k]["wall"].append(wall / base_wall)
            per_step[k].append(cpu / steps)
    rows = []
    for name, level in keys:
        cpu = statistics.median(ratios[(name, level)]["cpu"])
        target = FEATURE_TARGET if level == "feature" else (PARAM_TARGET if name in GRADIENT_METHODS else None)
        rows.append({"setup": setup_name, "balancer": name, "level": level, "ratio_cpu": round(cpu, 3),
                     "ratio_wall": round(statistics.median(ratios[(name, level)]["wall"]), 3),
                     "ms_per_step_cpu": round(1000 * statistics.median(per_step[(name, level)]), 2),
                     "target": target, "meets_target": None if target is None else cpu <= target})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--setups", default="small,wide", help=f"comma-separated, from {sorted(SETUPS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETUPS]
    if unknown or not chosen:
        parser.error(f"unknown setups {unknown}; expected a comma-separated subset of {sorted(SETUPS)}")
    torch.set_num_threads(1)
    tasks = [Task(n, "binary") for n in NAMES]
    rows = [row for name in chosen for row in measure(name, args.rounds, args.steps, tasks)]
    result = {
        "benchmark": "balancer step time / EW step time",
        "setup": {"backbone": "small_cnn", "input": list(INPUT), "tasks": N_TASKS, "optimizer": "SGD", "threads": 1,
                  "setups": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in SETUPS[k].items()}
                             for k in chosen},
                  "rounds": args.rounds, "steps_per_block": args.steps,
                  "statistic": "median over rounds of block time / EW (parameter level) block time",
                  "feature_level_defaults": "feature_reduction='sample', head_grads='unweighted'"},
        "targets": {"feature_level": f"<= {FEATURE_TARGET} x EW", "parameter_level": f"<= T = {N_TASKS} x EW"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "processor": platform.machine()},
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "balancers.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Balancer step time relative to EW", "",
             f"small_cnn trunk, {N_TASKS} binary tasks, 1x36x36 inputs, SGD, 1 thread; median of {args.rounds} "
             f"interleaved rounds x {args.steps} steps. EW = plain backward of the summed losses. Targets: feature "
             "level <= 1.2 x EW, parameter level <= T x EW. Setups: "
             + "; ".join(f"{k}: channels {SETUPS[k]['channels']}, {SETUPS[k]['feature_dim']} features, batch "
                         f"{SETUPS[k]['batch']}" for k in chosen) + ".", "",
             "| setup | balancer | level | x EW (CPU) | x EW (wall) | ms/step (CPU) | target | met |",
             "|---|---|---|---:|---:|---:|---:|:---:|"]
    for row in rows:
        target = "" if row["target"] is None else f"{row['target']:g}"
        met = "" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
        lines.append(f"| {row['setup']} | {row['balancer']} | {row['level']} | {row['ratio_cpu']:.2f} | "
                     f"{row['ratio_wall']:.2f} | {row['ms_per_step_cpu']:.1f} | {target} | {met} |")
    (args.out / "balancers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
