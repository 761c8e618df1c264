"""Step time of every balancer relative to equal weighting (EW), parameter- and feature-level.

Setups: the package's ``small_cnn`` backbone (two strided 3x3 convs, then a linear layer to a
feature vector) shared by 8 binary tasks (MultiMNIST-like: random 1x36x36 inputs, labels from
random linear teachers), one branch, SGD, torch on one thread. ``small``: 16/32 channels, 64
features, batch 128, every balancer at both levels. ``wide``: 32/64 channels, 128 features, batch
256, feature level only (parameter level would take minutes here) - it shows how the fixed
per-step cost of the aggregators shrinks relative to a larger step. ``cosreg_hvp1`` /
``cosreg_hvp2``: CosReg at parameter level with ``hvp_tasks=1`` / ``2`` (the second-order term of
1 or 2 sampled tasks per step, an unbiased estimate of the exact update). A step is zero_grad +
forward + per-task losses + ``balancer.backward`` + optimiser step.

In one process, blocks of steps run *interleaved* with blocks of the reference (EW at parameter
level): each round runs ``EW, v1, EW, v2, ..., vn, EW``, the variant order rotating every round,
and a variant's ratio for the round is its block time over the mean of the two EW blocks beside
it, so drifts in machine load (other jobs on a shared machine) hit both sides of a ratio alike.
The median over rounds is reported, with its interquartile range, from process CPU time (primary:
one thread, and CPU time is less disturbed by other jobs) and from wall time. The EW row's ratio
is each EW block against its two neighbours: the noise floor of the measurement. Targets (Mao et
al. 2024's motivation for the surrogate): feature-level <= 1.2 x EW, parameter-level <= T x EW
(T = 8 backward passes).

Writes benchmarks/results/balancers.json and balancers.md.

    python benchmarks/bench_balancers.py [--rounds 15] [--steps 4] [--setups small,wide]
        [--levels param,feature] [--balancers pcgrad,mgda]  (subsets, for quick checks)
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
from taskgrouping.balancing.catalogue import GRADIENT_METHODS, LOSS_WEIGHTING_METHODS
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
#: Parameter-level-only rows: a registered balancer with options, listed after the balancer's own rows.
OPTION_VARIANTS = {"cosreg_hvp1": ("cosreg", {"hvp_tasks": 1}), "cosreg_hvp2": ("cosreg", {"hvp_tasks": 2})}


def variants(levels: tuple[str, ...], only: set[str] | None = None) -> list[tuple[str, str]]:
    """EW at parameter level (the reference) first, then every balancer (or those in ``only``) at
    the requested levels."""
    out = [("ew", "param")]
    for name in GRADIENT_METHODS:
        if "param" in levels and name != "ew" and name not in ALWAYS_FEATURE:
            out.append((name, "param"))
        if "feature" in levels:
            out.append((name, "feature"))
        if "param" in levels:
            out += [(row, "param") for row, (base, _) in OPTION_VARIANTS.items() if base == name]
    if "param" in levels:
        out += [(name, "param") for name in LOSS_WEIGHTING_METHODS]
    return [out[0]] + [v for v in out[1:] if only is None or v[0] in only]


def make_balancer(name: str, level: str):
    name, options = OPTION_VARIANTS.get(name, (name, {}))
    options = dict(options)
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


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q1, q2, q3


def measure(setup_name: str, rounds: int, steps: int, tasks: list[Task], levels: tuple[str, ...],
            only: set[str] | None = None) -> list[dict]:
    spec = SETUPS[setup_name]
    batches = make_data(steps, spec["batch"], seed=1)
    keys = variants(tuple(lv for lv in spec["levels"] if lv in levels), only)
    reference, others = keys[0], keys[1:]
    setups = {k: Setup(*k, tasks, spec) for k in keys}
    for s in setups.values():  # warm-up (allocations, lazy imports, solver set-up)
        run_block(s, batches, 2)
    ratios: dict[tuple[str, str], dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in keys}
    per_step: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(others)
        order = others[shift:] + others[:shift]
        ref = [run_block(setups[reference], batches, steps)]
        for k in order:
            cpu, wall = run_block(setups[k], batches, steps)
            ref.append(run_block(setups[reference], batches, steps))
            (cpu0, wall0), (cpu1, wall1) = ref[-2], ref[-1]
            ratios[k]["cpu"].append(2 * cpu / (cpu0 + cpu1))
            ratios[k]["wall"].append(2 * wall / (wall0 + wall1))
            per_step[k].append(cpu / steps)
        for i in range(1, len(ref) - 1):  # the reference against its neighbours: the noise floor
            ratios[reference]["cpu"].append(2 * ref[i][0] / (ref[i - 1][0] + ref[i + 1][0]))
            ratios[reference]["wall"].append(2 * ref[i][1] / (ref[i - 1][1] + ref[i + 1][1]))
        per_step[reference] += [cpu / steps for cpu, _ in ref]
    rows = []
    for name, level in keys:
        q1, cpu, q3 = _quartiles(ratios[(name, level)]["cpu"])
        gradient = name in GRADIENT_METHODS or name in OPTION_VARIANTS
        target = FEATURE_TARGET if level == "feature" else (PARAM_TARGET if gradient else None)
        rows.append({"setup": setup_name, "balancer": name, "level": level, "ratio_cpu": round(cpu, 3),
                     "ratio_cpu_iqr": [round(q1, 3), round(q3, 3)],
                     "ratio_wall": round(statistics.median(ratios[(name, level)]["wall"]), 3),
                     "ms_per_step_cpu": round(1000 * statistics.median(per_step[(name, level)]), 2),
                     "target": target, "meets_target": None if target is None else cpu <= target})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--setups", default="small,wide", help=f"comma-separated, from {sorted(SETUPS)}")
    parser.add_argument("--levels", default="param,feature", help="comma-separated, from param, feature")
    parser.add_argument("--balancers", default="", help="comma-separated subset (default: all; EW always runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETUPS]
    if unknown or not chosen:
        parser.error(f"unknown setups {unknown}; expected a comma-separated subset of {sorted(SETUPS)}")
    levels = tuple(lv.strip() for lv in args.levels.split(",") if lv.strip())
    if not levels or set(levels) - {"param", "feature"}:
        parser.error(f"--levels must be a comma-separated subset of param, feature; got {args.levels!r}")
    known = set(GRADIENT_METHODS) | set(LOSS_WEIGHTING_METHODS) | ALWAYS_FEATURE | set(OPTION_VARIANTS)
    only = {b.strip().lower() for b in args.balancers.split(",") if b.strip()} or None
    if only and only - known:
        parser.error(f"unknown balancers {sorted(only - known)}; expected some of {sorted(known)}")
    torch.set_num_threads(1)
    tasks = [Task(n, "binary") for n in NAMES]
    rows = [row for name in chosen for row in measure(name, args.rounds, args.steps, tasks, levels, only)]
    result = {
        "benchmark": "balancer step time / EW step time",
        "setup": {"backbone": "small_cnn", "input": list(INPUT), "tasks": N_TASKS, "optimizer": "SGD", "threads": 1,
                  "setups": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in SETUPS[k].items()}
                             for k in chosen},
                  "rounds": args.rounds, "steps_per_block": args.steps,
                  "statistic": "median over rounds of block time / mean of the two adjacent EW (parameter "
                               "level) blocks; ratio_cpu_iqr: quartiles over rounds; the EW row: each EW block "
                               "against its neighbours (noise floor)",
                  "feature_level_defaults": "feature_reduction='sample', head_grads='unweighted'"},
        "targets": {"feature_level": f"<= {FEATURE_TARGET} x EW", "parameter_level": f"<= T = {N_TASKS} x EW"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "processor": platform.machine()},
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "balancers.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Balancer step time relative to EW", "",
             f"small_cnn trunk, {N_TASKS} binary tasks, 1x36x36 inputs, SGD, 1 thread; median of {args.rounds} "
             f"rounds of {args.steps}-step blocks, each block timed against the mean of the EW blocks run just "
             "before and after it (IQR: quartiles over rounds; the EW row is EW against its neighbours, the "
             "noise floor). EW = plain backward of the summed losses. Targets: feature "
             "level <= 1.2 x EW, parameter level <= T x EW. Setups: "
             + "; ".join(f"{k}: channels {SETUPS[k]['channels']}, {SETUPS[k]['feature_dim']} features, batch "
                         f"{SETUPS[k]['batch']}" for k in chosen) + ".", "",
             "| setup | balancer | level | x EW (CPU) | IQR (CPU) | x EW (wall) | ms/step (CPU) | target | met |",
             "|---|---|---|---:|---:|---:|---:|---:|:---:|"]
    for row in rows:
        target = "" if row["target"] is None else f"{row['target']:g}"
        met = "" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
        q1, q3 = row["ratio_cpu_iqr"]
        lines.append(f"| {row['setup']} | {row['balancer']} | {row['level']} | {row['ratio_cpu']:.2f} | "
                     f"{q1:.2f}-{q3:.2f} | {row['ratio_wall']:.2f} | {row['ms_per_step_cpu']:.1f} | {target} | {met} |")
    (args.out / "balancers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
