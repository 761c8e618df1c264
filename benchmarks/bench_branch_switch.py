"""Whole runs with ``train.branches=loop`` and ``stacked``: the same results.json metrics, and their wall times.

``taskgrouping run --preset multimnist`` with the methods whose networks hold several copies of the
backbone (``single_task``: 8 branches, ``dmtg``: K = 2 branches with every head, ``interrogate``: 9
gated streams), run from the same seed: the loop, stacked, the loop again, stacked again, and the loop
with other convolution kernels (oneDNN off on the CPU, cuDNN off on CUDA: the same arithmetic summed in
another order, which is all that stacking changes). Stacked vs loop differ from the first step by float
rounding (~1e-7), and training amplifies such differences (Adam, DMTG's Gumbel draws and pruning
decisions): the loop with other kernels is the floor that stacked vs loop is judged against; the loop's
rerun shows that a run repeats itself. TF32 is switched off (float32 arithmetic, as the CPU's). Every
per-task metric (test and validation) of every method is compared: the largest relative difference
``|a − b| / max(|a|, 1e-6)`` per method and overall, and how many exceed 1e-4; groupings must be equal. Wall time is the run's (data preparation, every method, evaluation); the reruns' times are
the ones to compare (the first two runs hold the process's warm-up).

Writes benchmarks/results/branch_switch_{cpu,cuda}.json and .md.

    python benchmarks/bench_branch_switch.py [--epochs 2] [--n-train 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from taskgrouping.config import build_config
from taskgrouping.engine.driver import git_revision
from taskgrouping.experiment import run_experiment
from taskgrouping.io import atomic_write_json, atomic_write_text

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHODS = ("single_task", "dmtg", "interrogate")
RUNS = (("loop", "loop"), ("stacked", "stacked"), ("loop again", "loop"), ("stacked again", "stacked"),
        ("loop, other kernels", "loop"))
TOLERANCE = 1e-4


def metrics(summary: dict) -> dict[str, float]:
    """Every float per-task metric (test and validation) of every method, by ``method/split/task/metric``."""
    return {f"{m}/{split}/{t}/{k}": v for m, rec in summary["methods"].items()
            for split in ("per_task", "val_per_task") for t, d in rec[split].items() for k, v in d.items()
            if isinstance(v, float)}


def compare(a: dict[str, float], b: dict[str, float]) -> dict:
    if a.keys() != b.keys():
        raise SystemExit(f"the runs report different metrics: {sorted(a.keys() ^ b.keys())[:5]}")
    rel = {k: abs(a[k] - b[k]) / max(abs(a[k]), 1e-6) for k in a}
    worst = max(rel, key=rel.__getitem__)
    return {"max_rel_diff": rel[worst], "worst_metric": worst, "above_tolerance": sum(r > TOLERANCE for r in rel.values()),
            "metrics": len(rel), "max_rel_diff_by_method": {m: max(r for k, r in rel.items() if k.startswith(m + "/"))
                                                            for m in METHODS}}


def other_kernels(device: str):
    """The same convolutions by other kernels: PyTorch's own instead of cuDNN's / oneDNN's (TF32 stays off)."""
    if device == "cuda":
        return torch.backends.cudnn.flags(enabled=False, allow_tf32=False)
    return torch.backends.mkldnn.flags(enabled=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summaries, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, mode in RUNS:
            cfg = build_config(preset="multimnist", overrides=[
                f"methods=[{','.join(METHODS)}]", f"data.n_train={args.n_train}", "data.n_val=256",
                "data.n_test=512", f"train.epochs={args.epochs}", "train.progress=false",
                f"train.device={device}", f"train.branches={mode}"])
            folder = Path(tmp) / f"run{len(seconds)}"
            started = time.perf_counter()
            with other_kernels(device) if "other kernels" in label else nullcontext():
                run_experiment(cfg, folder, echo=lambda _: None)
            seconds[label] = time.perf_counter() - started
            summaries[label] = json.loads((folder / "results.json").read_text())
            print(f"{label}: {seconds[label]:.1f} s", flush=True)
    per = {label: metrics(s) for label, s in summaries.items()}
    groupings = {label: {m: r["grouping"] for m, r in s["methods"].items()} for label, s in summaries.items()}
    result = {
        "setup": {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                  "preset": "multimnist", "methods": list(METHODS), "epochs": args.epochs, "n_train": args.n_train,
                  "tf32": False, "torch": torch.__version__, "git_revision": git_revision()},
        "seconds": seconds,
        "loop_vs_loop_again": compare(per["loop"], per["loop again"]),
        "loop_vs_loop_other_kernels": compare(per["loop"], per["loop, other kernels"]),
        "loop_vs_stacked": compare(per["loop"], per["stacked"]),
        "stacked_over_loop_seconds": seconds["stacked again"] / seconds["loop again"],
        "groupings_equal": groupings["loop"] == groupings["stacked"],
        "tolerance": TOLERANCE,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"branch_switch_{device}.json", result, strict=True)
    lines = [f"# Whole runs, train.branches loop vs stacked ({result['setup']['device_name'] or device})", "",
             f"multimnist preset, methods {', '.join(METHODS)}, {args.epochs} epochs, n_train {args.n_train}, "
             f"TF32 off, torch {torch.__version__}.", "",
             "| comparison | metrics | max relative difference | " + " | ".join(METHODS) + " | worst metric | "
             "above 1e-4 |", "|---" * (5 + len(METHODS)) + "|"]
    for key in ("loop_vs_loop_again", "loop_vs_loop_other_kernels", "loop_vs_stacked"):
        c = result[key]
        by = " | ".join(f"{c['max_rel_diff_by_method'][m]:.1e}" for m in METHODS)
        lines.append(f"| {key.replace('_', ' ')} | {c['metrics']} | {c['max_rel_diff']:.1e} | {by} | {c['worst_metric']} | "
                     f"{c['above_tolerance']} |")
    lines += ["", f"Groupings equal (loop vs stacked): {'yes' if result['groupings_equal'] else 'NO'}.", "",
              "| run | wall seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()] + [
              "", f"Stacked ÷ loop, the reruns' wall times: {result['stacked_over_loop_seconds']:.2f}."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(OUT / f"branch_switch_{device}.md", text)
    print(text)


if __name__ == "__main__":
    main()
