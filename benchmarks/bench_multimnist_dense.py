"""MultiMNIST dense: do label statistics reveal the known grouping, and does the grouping pay off?

1. Pixel-wise Pearson correlation between every two tasks' targets, pooled over all pixels of the
   training split (the preset's images, every label kept), for seeds 0, 1, 2 and a larger 3,000-image
   split: the largest |r| within a digit and across digits. The same for the x / y derivative maps
   (``maps: [mask, dx, dy]``) and, as a caveat, for the *squared* targets (where each digit's maps
   are non-zero), which do reveal the sides.
2. ``taskgrouping run --preset multimnist_dense --set seed=S`` for each seed: total test loss of
   naive MTL, single-task learning and the known grouping (oracle).

Prints two tables (no timings). Run: python benchmarks/bench_multimnist_dense.py [--seeds 0 1 2]
[--runs DIR] [--no-train]; with --runs, a seed whose DIR/seed-S/results.json exists is read, not rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from taskgrouping.config import load_preset
from taskgrouping.data.multimnist_dense import multimnist_dense

METHODS = ("naive_mtl", "single_task", "oracle")


def correlations(data, square: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Pearson r between tasks' targets over the pixels where both are labelled (float64)."""
    names = data.task_names
    ys = [data.train.targets[n].flatten().double() for n in names]
    if square:
        ys = [y.square() for y in ys]
    r = torch.eye(len(names), dtype=torch.float64)
    for i, j in itertools.combinations(range(len(names)), 2):
        both = ~(torch.isnan(ys[i]) | torch.isnan(ys[j]))
        r[i, j] = r[j, i] = torch.corrcoef(torch.stack([ys[i][both], ys[j][both]]))[0, 1]
    return r, names


def max_within_across(r: torch.Tensor, names: list[str]) -> tuple[tuple[float, str], tuple[float, str]]:
    """(max |r|, pair) over pairs of one digit and over pairs of different digits."""
    best = {True: (0.0, ""), False: (0.0, "")}
    for i, j in itertools.combinations(range(len(names)), 2):
        same = names[i].split("_")[0] == names[j].split("_")[0]
        v = abs(float(r[i, j]))
        if v > best[same][0]:
            best[same] = (v, f"{names[i]}~{names[j]}")
    return best[True], best[False]


def correlation_table(seeds: list[int]) -> str:
    data_opts = {k: v for k, v in load_preset("multimnist_dense")["data"].items() if k != "name"}
    rows = ["| targets | images | seed | max abs r within a digit | max abs r across digits |", "|---|---|---|---|---|"]
    cases = [("preset, each task labelled on its own 1/4 (pixels labelled for both)", dict(data_opts), seeds[0],
              False)]
    full = dict(data_opts, label_fraction=1.0)
    cases += [("preset maps (mask, ddiag, danti), all labels", full, s, False) for s in seeds]
    cases += [("preset maps (mask, ddiag, danti), all labels", dict(full, n_train=3000), seeds[0], False),
              ("maps mask, dx, dy, all labels", dict(full, n_train=3000, maps=["mask", "dx", "dy"]), seeds[0], False),
              ("squared targets (preset maps), all labels", dict(full, n_train=3000), seeds[0], True)]
    for label, opts, seed, square in cases:
        d = multimnist_dense(**dict(opts, n_val=1, n_test=1, seed=seed))
        (w, wp), (a, ap) = max_within_across(*correlations(d, square))
        rows.append(f"| {label} | {opts['n_train']} | {seed} | {w:.3f} ({wp}) | {a:.3f} ({ap}) |")
    return "\n".join(rows)


def run_seed(seed: int, root: Path) -> dict:
    out = root / f"seed-{seed}"
    if not (out / "results.json").is_file():
        subprocess.run([sys.executable, "-m", "taskgrouping.cli", "run", "--preset", "multimnist_dense", "--set",
                        f"seed={seed}", "--set", "train.progress=false", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["methods"]


def loss_table(seeds: list[int], root: Path) -> str:
    rows = ["| seed | " + " | ".join(METHODS) + " | oracle beats both |", "|---" * (len(METHODS) + 2) + "|"]
    for seed in seeds:
        res = run_seed(seed, root)
        tot = {m: res[m]["total_test_loss"] for m in METHODS}
        wins = tot["oracle"] < min(tot["naive_mtl"], tot["single_task"])
        rows.append(f"| {seed} | " + " | ".join(f"{tot[m]:.3f}" for m in METHODS) + f" | {'yes' if wins else 'NO'} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=None, help="folder for the run directories (default: a temp dir)")
    ap.add_argument("--no-train", action="store_true", help="only the correlation table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("Pixel-wise Pearson r between task targets (training split)\n")
    print(correlation_table(args.seeds))
    if args.no_train:
        return
    print("\nTotal test loss, preset multimnist_dense (sum of the 6 tasks' MSE on standardised targets)\n")
    if args.runs is None:
        with tempfile.TemporaryDirectory() as tmp:
            print(loss_table(args.seeds, Path(tmp)))
    else:
        print(loss_table(args.seeds, args.runs))


if __name__ == "__main__":
    main()
