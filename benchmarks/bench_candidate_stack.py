"""Two-shot candidate networks trained one after another vs together as one stack (``<method>.backend``).

HOA's first shot on MultiMNIST-sized data: the 28 pair networks of 8 binary tasks (small_cnn
{"channels": [16, 32], "feature_dim": 64}, batch 128, Adam lr 1e-3, the run's early stopping off), trained
by ``run_jobs`` with each backend in ONE process, interleaved over rounds (the order reversed every other
round; the medians of the wall times are reported):

* ``sequential``: one network after another (the default);
* ``stacked`` with ``train.branches=loop``: the 28 networks as one stack, their trunks one after another in
  each step (one data pass, one optimiser step, one validation pass for all);
* ``stacked`` with ``train.branches=stacked``: the same stack, the trunks as one vmapped call;
* ``processes`` with 2 workers (what a 2-core CPU run would use; on a GPU machine processes share the GPU):
  timed in the same rounds.

Every backend's results are checked against the sequential ones: the stack with the loop must give every
network's validation and test losses bit for bit, stacked to a relative 1e-4 (recorded, not a test).

Writes benchmarks/results/candidate_stack{,_cuda}{,_quick}.json and .md (``--quick``: 64 training rows, one
round).

    OMP_NUM_THREADS=1 python benchmarks/bench_candidate_stack.py [--quick] [--epochs 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from taskgrouping.data.builtin import multimnist
from taskgrouping.engine.driver import git_revision
from taskgrouping.engine.fit import RunContext
from taskgrouping.engine.jobs import TrainingJob, run_jobs
from taskgrouping.engine.trainer import TrainConfig, resolve_device
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.io import atomic_write_json, atomic_write_text

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
VARIANTS = {"sequential": ("sequential", "loop"), "stacked, trunks in a loop": ("stacked", "loop"),
            "stacked, trunks vmapped": ("stacked", "stacked"), "processes, 2 workers": ("processes", "loop")}
TOLERANCE = 1e-4


def losses(results) -> dict[str, float]:
    return {f"{r.tag}/{split}/{t}": m["loss"] for r in results for split in ("val", "test")
            for t, m in getattr(r, split).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=1024)
    args = ap.parse_args()
    n_train, rounds = (64, 1) if args.quick else (args.n_train, args.rounds)
    device = resolve_device("auto")
    data = multimnist(n_train=n_train, n_val=256, n_test=256, seed=0)
    names = data.task_names
    jobs = [TrainingJob(f"pair_{a}-{b}", Grouping.partition([[names[a], names[b]]]))
            for a, b in itertools.combinations(range(len(names)), 2)]
    base = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, progress=False)
    model = {"backbone": "small_cnn", "options": {"channels": [16, 32], "feature_dim": 64}, "shared_blocks": 0}
    variants = VARIANTS if device.type == "cpu" else {k: v for k, v in VARIANTS.items() if v[0] != "processes"}
    times: dict[str, list[float]] = {k: [] for k in variants}
    results: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            backend, branches = variants[name]
            ctx = RunContext(data, seed=0, train=replace(base, branches=branches), model=model,
                             balancer={"name": "ew", "options": {}})
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = run_jobs(ctx, jobs, backend=backend, workers=2)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            results[name] = losses(out)
            print(f"round {r}: {name} {times[name][-1]:.2f} s", flush=True)
    ref = results["sequential"]
    rows = []
    for name in variants:
        rel = max(abs(results[name][k] - v) / max(abs(v), 1e-12) for k, v in ref.items())
        rows.append({"variant": name, "backend": variants[name][0], "branches": variants[name][1],
                     "seconds": statistics.median(times[name]), "all_seconds": times[name],
                     "over_sequential": statistics.median(times[name]) / statistics.median(times["sequential"]),
                     "max_rel_loss_diff_vs_sequential": rel, "bit_for_bit": results[name] == ref})
    result = {"setup": {"device": device.type, "device_name": torch.cuda.get_device_name(device)
                        if device.type == "cuda" else platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "networks": len(jobs), "tasks_each": 2,
                        "n_train": n_train, "epochs": args.epochs, "rounds": rounds, "batch": base.batch_size,
                        "backbone": model, "quick": args.quick, "torch": torch.__version__,
                        "git_revision": git_revision(), "seconds": round(time.perf_counter() - started, 1)},
              "rows": rows}
    stem = "candidate_stack" + ("_cuda" if device.type == "cuda" else "") + ("_quick" if args.quick else "")
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"{stem}.json", result, strict=True)
    s = result["setup"]
    lines = [f"# Two-shot candidates: one after another vs one stack ({s['device_name']}, {s['threads']} thread"
             f"{'s' if s['threads'] > 1 else ''})", "",
             f"HOA's first shot: {s['networks']} pair networks of MultiMNIST's 8 tasks, small_cnn, {s['n_train']} "
             f"training rows, {s['epochs']} epochs, batch {s['batch']}; medians of {s['rounds']} interleaved "
             f"rounds of the whole fan-out (`run_jobs`); torch {s['torch']}{'; quick run' if s['quick'] else ''}.",
             "", "| backend | train.branches | seconds | ÷ sequential | losses vs sequential |", "|---|---|---|---|---|"]
    for row in rows:
        same = "bit for bit" if row["bit_for_bit"] else f"max rel. diff {row['max_rel_loss_diff_vs_sequential']:.1e}"
        lines.append(f"| {row['backend']} | {row['branches']} | {row['seconds']:.2f} | {row['over_sequential']:.2f} | "
                     f"{same} |")
    atomic_write_text(OUT / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
