"""Speed of Standley network selection.

1. The exhaustive search (and the MILP) on Standley et al.'s 36-network Taskonomy instance
   (setting 1, validation losses; optimal and HOA candidates), budgets 1, 1.5, ..., 5.
   Target: < 50 ms per budget for the search.
2. The MILP on a synthetic 40-task, pairs-only HOA instance: 40 half-sized singles (cost 0.5),
   40 singles (cost 1), 780 pairs (cost 1) = 860 candidate networks, with losses from a seeded
   generator with a planted structure (8 clusters of 5 tasks; pairs inside a cluster help both
   tasks, pairs across clusters mostly hurt). Solved to proven optimality; target < 10 s.

Writes benchmarks/results/selection.json and benchmarks/results/selection.md.
Run: python benchmarks/bench_selection.py
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import torch

from taskgrouping.methods.standley import Network, hoa_networks, read_standley_results, select_networks

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "grouping-data" / "standley_taskgrouping" / "network_selection"
OUT = ROOT / "benchmarks" / "results"
BUDGETS = [1 + 0.5 * i for i in range(9)]
REPEATS = 5


def planted_instance(n_tasks: int = 40, cluster_size: int = 5, seed: int = 0) -> tuple[list[Network], list[int]]:
    """Pairs-only candidate list with a planted cluster structure; returns (networks, cluster of each task)."""
    rng = np.random.default_rng(seed)
    tasks = [f"t{i:02d}" for i in range(n_tasks)]
    cluster = [i // cluster_size for i in range(n_tasks)]
    base = rng.uniform(0.5, 1.5, n_tasks)
    nets = [Network((t,), 0.5, {t: base[i] * rng.uniform(1.05, 1.15)}) for i, t in enumerate(tasks)]
    nets += [Network((t,), 1.0, {t: base[i]}) for i, t in enumerate(tasks)]
    for i, j in itertools.combinations(range(n_tasks), 2):
        if cluster[i] == cluster[j]:
            gi, gj = rng.uniform(0.03, 0.15, 2)
        else:
            gi, gj = rng.normal(-0.04, 0.03, 2)
        nets.append(Network((tasks[i], tasks[j]), 1.0, {tasks[i]: base[i] * (1 - gi), tasks[j]: base[j] * (1 - gj)}))
    return nets, cluster


def time_call(fn, repeats: int = REPEATS) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    torch.set_num_threads(1)
    results: dict = {"machine": {"python": platform.python_version(), "scipy": scipy.__version__,
                                 "processor": platform.processor() or platform.machine(),
                                 "cpus": os.cpu_count(), "load_avg_1min_at_start": os.getloadavg()[0]},
                     "standley_36": [], "planted_860": []}
    val = list(read_standley_results(DATA / "results.txt").networks)
    candidates = {"optimal": val, "hoa": hoa_networks(val)}
    for approx, nets in candidates.items():
        for b in BUDGETS:
            row = {"approx": approx, "budget": b}
            for solver in ("search", "milp"):
                sec, sel = time_call(lambda: select_networks(nets, b, solver=solver))
                row[f"{solver}_ms"] = round(sec * 1e3, 3)
                row[f"{solver}_value"] = sel.total
            results["standley_36"].append(row)
            print(row, flush=True)

    nets, cluster = planted_instance()
    tasks = sorted({t for n in nets for t in n.tasks})
    for b in (20.0, 22.5, 25.0, 30.0, 40.0):
        sec, sel = time_call(lambda: select_networks(nets, b, solver="milp", time_limit=60), repeats=1)
        within = sum(1 for n in sel.networks if len(n.tasks) == 2
                     and cluster[tasks.index(n.tasks[0])] == cluster[tasks.index(n.tasks[1])])
        row = {"budget": b, "n_networks": len(nets), "milp_s": round(sec, 3), "proven_optimal": sel.optimal,
               "value": sel.total, "cost": sel.cost, "n_chosen": len(sel.networks),
               "pairs_within_cluster": within,
               "pairs_across": sum(1 for n in sel.networks if len(n.tasks) == 2) - within}
        results["planted_860"].append(row)
        print(row, flush=True)

    worst = {s: max(r[f"{s}_ms"] for r in results["standley_36"]) for s in ("search", "milp")}
    results["summary"] = {"search_worst_ms_per_budget": worst["search"], "search_target_ms": 50,
                          "milp36_worst_ms_per_budget": worst["milp"],
                          "milp860_worst_s": max(r["milp_s"] for r in results["planted_860"]),
                          "milp860_target_s": 10,
                          "all_proven_optimal": all(r["proven_optimal"] for r in results["planted_860"])}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "selection.json").write_text(json.dumps(results, indent=2) + "\n")

    md = ["# Network selection speed", "",
          f"Python {results['machine']['python']}, SciPy {results['machine']['scipy']} (HiGHS), one thread; "
          f"median of {REPEATS} runs; {results['machine']['cpus']} CPUs, 1-minute load average "
          f"{results['machine']['load_avg_1min_at_start']:.1f} at start (shared machine).", "",
          "## Standley et al. setting 1, 36 candidate networks (validation losses)", "",
          "| candidates | budget | search ms | MILP ms | value |", "|---|---|---|---|---|"]
    for r in results["standley_36"]:
        md.append(f"| {r['approx']} | {r['budget']:g} | {r['search_ms']:.1f} | {r['milp_ms']:.1f} | "
                  f"{r['search_value']:.5f} |")
    md += ["", f"Worst search time per budget: {worst['search']:.1f} ms (target < 50 ms).", "",
           "## Planted 40-task pairs-only instance, 860 candidate networks (MILP, one run each)", "",
           "| budget | seconds | proven optimal | value | cost | networks | pairs within / across clusters |",
           "|---|---|---|---|---|---|---|"]
    for r in results["planted_860"]:
        md.append(f"| {r['budget']:g} | {r['milp_s']:.2f} | {r['proven_optimal']} | {r['value']:.4f} | "
                  f"{r['cost']:g} | {r['n_chosen']} | {r['pairs_within_cluster']} / {r['pairs_across']} |")
    md += ["", f"Worst MILP time: {results['summary']['milp860_worst_s']:.2f} s (target < 10 s)."]
    (OUT / "selection.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
