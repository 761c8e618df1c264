"""Training cost of the grouping methods relative to DMTG, on the planted benchmark.

Setting: the ``planted`` preset (N = 9 regression tasks in 3 planted groups, K = 3), the same
training settings for every method (preset, ``--epochs`` epochs, one torch thread), one seed.
Every method runs through :func:`taskgrouping.experiment.run_experiment` on its own; its
``train_seconds`` (sum of the per-epoch wall time of every network it trained -- candidate,
early-stopped, sampled, affinity and final networks alike; evaluation outside the epochs and the
searches are not included) is divided by DMTG's. ``wall_seconds`` (everything the method did) is
reported too.

Methods: hoa, esa, tag, mtg_net, random, optimal (trains all 2^9 - 1 = 511 subsets + 9 half-size
networks; skipped with the reason printed when not allowed at this N) and dmtg (the reference).
Two-shot methods use their default options (budget = K, sequential backend).

Writes benchmarks/results/grouping_cost.json and benchmarks/results/grouping_cost.md.
Run: python benchmarks/bench_grouping_cost.py [--epochs 10] [--methods hoa,tag,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from taskgrouping.config import build_config
from taskgrouping.methods.base import available_methods

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
ORDER = ["hoa", "esa", "tag", "mtg_net", "random", "optimal"]


def _register_two_shot() -> None:
    """Import the two-shot method modules in case the method registry does not list them yet."""
    import importlib

    for mod in ("standley", "tag", "mtg_net"):
        importlib.import_module(f"taskgrouping.methods.{mod}")


def run_method(name: str, epochs: int, seed: int) -> dict:
    from taskgrouping.experiment import run_experiment

    config = build_config(preset="planted", overrides=[f"methods=[{name}]", f"train.epochs={epochs}",
                                                       "train.progress=false", f"seed={seed}", "threads=1"])
    with tempfile.TemporaryDirectory(prefix=f"cost_{name}_") as out:
        t0 = time.perf_counter()
        summary = run_experiment(config, out, echo=lambda m: None)
        wall = time.perf_counter() - t0
    rec = summary["methods"][name]
    return {"train_seconds": rec["train_seconds"], "wall_seconds": wall, "n_networks": rec["n_networks"],
            "total_test_loss": rec["total_test_loss"], "grouping": rec["grouping"],
            "known_groups": summary["dataset"]["known_groups"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(ORDER))
    args = parser.parse_args()
    torch.set_num_threads(1)
    _register_two_shot()
    methods = available_methods()
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    n_tasks = int(build_config(preset="planted")["data"]["n_tasks"])

    notes: list[str] = []
    rows: dict[str, dict] = {}
    reference = None
    if "dmtg" in methods:
        print("[dmtg] running (reference)", flush=True)
        reference = run_method("dmtg", args.epochs, args.seed)
        rows["dmtg"] = reference
    else:
        msg = ("method 'dmtg' is not registered (taskgrouping.methods.dmtg missing); the ratios to DMTG "
               "could not be computed, only absolute seconds are reported")
        print(msg, flush=True)
        notes.append(msg)
    for name in wanted:
        if name not in methods:
            msg = f"{name}: skipped, method not registered"
            print(msg, flush=True)
            notes.append(msg)
            continue
        if name == "optimal" and n_tasks > 10:
            msg = f"optimal: skipped, it trains 2^{n_tasks} - 1 subsets and refuses N > optimal.max_tasks=10"
            print(msg, flush=True)
            notes.append(msg)
            continue
        print(f"[{name}] running", flush=True)
        rows[name] = run_method(name, args.epochs, args.seed)
        print(f"[{name}] {rows[name]['train_seconds']:.1f} s training, {rows[name]['n_networks']} networks",
              flush=True)
    for rec in rows.values():
        rec["ratio_to_dmtg"] = rec["train_seconds"] / reference["train_seconds"] if reference else None

    result = {
        "setting": {"preset": "planted", "n_tasks": n_tasks, "K": 3, "epochs": args.epochs, "seed": args.seed,
                    "threads": 1},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_average_start": os.getloadavg()[0]},
        "methods": rows, "notes": notes,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "grouping_cost.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Training cost of grouping methods relative to DMTG",
        "",
        f"Planted preset, N = {n_tasks}, K = 3, {args.epochs} epochs, seed {args.seed}, one torch thread; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs "
        f"(shared machine, 1-minute load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "`train s` = summed epoch time of every network the method trained; `wall s` = the method's whole run.",
        "",
        "| method | networks trained | train s | wall s | train s / DMTG's | total test loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in rows.items():
        ratio = f"{rec['ratio_to_dmtg']:.2f}" if rec["ratio_to_dmtg"] is not None else "n/a"
        lines.append(f"| {name} | {rec['n_networks']} | {rec['train_seconds']:.1f} | {rec['wall_seconds']:.1f} | "
                     f"{ratio} | {rec['total_test_loss']:.4f} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    (OUT / "grouping_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
