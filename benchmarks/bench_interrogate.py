"""Cost of InterroGate on MultiMNIST-sized inputs (1x28x28, 8 binary tasks, batch 128, the
multimnist preset's small_cnn), measured interleaved in one process on one CPU thread:

1. Training step time (forward, losses, backward, optimiser step(s)) of InterroGate's gated
   network - the sparsity loss and the gates' own optimiser included - divided by the naive-MTL
   step time. The paper reports 1.1-1.5x; the gated network runs N + 1 = 9 copies of the
   backbone, so on a backbone this small the ratio is close to N + 1 (the STL step is shown too).
2. Inference time (eval, no grad) of the compiled network divided by the single-task networks
   (N branches), for gate patterns from "all task-specific" (= STL) to "all shared" (= naive MTL),
   with the FLOPs ratio alongside.

Writes benchmarks/results/interrogate.json and benchmarks/results/interrogate.md.
Run: python benchmarks/bench_interrogate.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from taskgrouping.flops import count_flops
from taskgrouping.methods.interrogate import InterroGateObjective, InterroGateOptions, build_gated_network
from taskgrouping.models.backbones import build_backbone, output_shape
from taskgrouping.models.branched import build_branched_model
from taskgrouping.models.heads import make_head
from taskgrouping.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
SHAPE = (1, 28, 28)
BATCH = 128
OPTIONS = {"channels": [16, 32], "feature_dim": 64}
TRAIN_REPEATS = 15
INFER_REPEATS = 30
PATTERNS = {"all task-specific": 1.0, "75% task-specific": 0.75, "50% task-specific": 0.5,
            "25% task-specific": 0.25, "all shared": 0.0}


def tasks() -> list[Task]:
    return [Task(f"{side}_{p}", "binary") for side in ("left", "right") for p in ("even", "gt4", "loop", "prime")]


def gated_model(task_list: list[Task]):
    torch.manual_seed(0)
    shared = build_backbone("small_cnn", SHAPE, **OPTIONS)
    branches = {t.name: build_backbone("small_cnn", SHAPE, **OPTIONS) for t in task_list}
    feat = output_shape(shared, SHAPE)
    heads = {t.name: make_head(t, feat, SHAPE) for t in task_list}
    return build_gated_network(shared, branches, heads)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def training_steps(task_list: list[Task], x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict:
    names = [t.name for t in task_list]
    mtl = build_branched_model(task_list, [names], SHAPE, "small_cnn", OPTIONS)
    stl = build_branched_model(task_list, [[n] for n in names], SHAPE, "small_cnn", OPTIONS)
    gated = gated_model(task_list)
    objective = InterroGateObjective(gated, task_list, InterroGateOptions(gate_optimizer="adam", gate_lr=0.01))
    opt_mtl = torch.optim.Adam(mtl.parameters(), lr=1e-3)
    opt_stl = torch.optim.Adam(stl.parameters(), lr=1e-3)
    opt_gated = torch.optim.Adam(objective.param_groups(gated)[0]["params"], lr=1e-3)

    def step_plain(model, opt):
        preds = model(x)
        loss = sum(t.loss(preds[t.name], y[t.name]) for t in task_list)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_gated():
        out = objective(gated, x, y)
        opt_gated.zero_grad(set_to_none=True)
        (sum(out.losses.values()) + out.extra_loss).backward()
        opt_gated.step()
        objective.after_step()

    runs = {"naive_mtl": lambda: step_plain(mtl, opt_mtl), "single_task": lambda: step_plain(stl, opt_stl),
            "interrogate": step_gated}
    for fn in runs.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(TRAIN_REPEATS):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for k in order:
            times[k].append(timed(runs[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_seconds": med, "interrogate_over_naive_mtl": med["interrogate"] / med["naive_mtl"],
            "interrogate_over_single_task": med["interrogate"] / med["single_task"],
            "single_task_over_naive_mtl": med["single_task"] / med["naive_mtl"]}


@torch.no_grad()
def inference(task_list: list[Task], x: torch.Tensor) -> list[dict]:
    names = [t.name for t in task_list]
    stl = build_branched_model(task_list, [[n] for n in names], SHAPE, "small_cnn", OPTIONS).eval()
    stl_flops = count_flops(stl, SHAPE)
    gated = gated_model(task_list)
    rows = []
    for label, frac in PATTERNS.items():
        g = torch.Generator().manual_seed(0)
        gated.set_gates({k: torch.rand(p.alpha.shape, generator=g) < frac for k, p in gated.gate_points().items()})
        compiled = gated.compile().eval()
        for _ in range(3):
            compiled(x), stl(x)
        tc, ts = [], []
        for r in range(INFER_REPEATS):
            if r % 2 == 0:
                tc.append(timed(lambda: compiled(x)))
                ts.append(timed(lambda: stl(x)))
            else:
                ts.append(timed(lambda: stl(x)))
                tc.append(timed(lambda: compiled(x)))
        mc, ms = statistics.median(tc), statistics.median(ts)
        flops = count_flops(compiled, SHAPE)
        rows.append({"pattern": label, "task_specific_fraction": frac, "compiled_seconds": mc, "stl_seconds": ms,
                     "time_ratio": mc / ms, "compiled_flops": flops, "stl_flops": stl_flops,
                     "flops_ratio": flops / stl_flops})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    task_list = tasks()
    torch.manual_seed(0)
    x = torch.rand(BATCH, *SHAPE)
    y = {t.name: torch.randint(0, 2, (BATCH,)) for t in task_list}
    train = training_steps(task_list, x, y)
    infer = inference(task_list, x)
    result = {"setup": {"input": list(SHAPE), "batch": BATCH, "tasks": len(task_list), "backbone": "small_cnn",
                        "backbone_options": OPTIONS, "threads": 1, "train_repeats": TRAIN_REPEATS,
                        "inference_repeats": INFER_REPEATS, "torch": torch.__version__,
                        "platform": platform.platform(), "processor": platform.processor()},
              "training_step": train, "inference": infer}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "interrogate.json").write_text(json.dumps(result, indent=1) + "\n")
    med = train["median_seconds"]
    lines = ["# InterroGate cost (MultiMNIST-sized, 8 tasks, batch 128, small_cnn, 1 CPU thread)", "",
             "Training step (median of interleaved repeats; paper: InterroGate 1.1-1.5x naive MTL):", "",
             "| network | step ms | ÷ naive MTL |", "|---|---|---|"]
    for k in ("naive_mtl", "single_task", "interrogate"):
        lines.append(f"| {k} | {1e3 * med[k]:.1f} | {med[k] / med['naive_mtl']:.2f} |")
    lines += ["", "Inference of the compiled network vs the 8 single-task networks (forced gate patterns):", "",
              "| gates | compiled ms | STL ms | time ÷ STL | FLOPs ÷ STL |", "|---|---|---|---|---|"]
    for r in infer:
        lines.append(f"| {r['pattern']} | {1e3 * r['compiled_seconds']:.2f} | {1e3 * r['stl_seconds']:.2f} | "
                     f"{r['time_ratio']:.2f} | {r['flops_ratio']:.3f} |")
    (OUT / "interrogate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
