"""DMTG on real data without a known grouping (run by hand; not part of the tests).

scikit-learn's handwritten digits (the ``digits`` preset: 8x8 images, 4 binary tasks of the digit - even,
greater than 4, has a loop, prime - K = 2, MLP) are the real data this offline project can ship. Nothing
says which grouping is right, so the check is the one a user would make: NormGain_E vs naive MTL of the
default DMTG recipe beside one random grouping and ``label_clusters`` (its grouping follows the tasks'
label correlations, which here are those of functions of one digit), seeds 0-2, at the preset's 5 epochs
(a smoke setting: every method is still improving) and at 20. Every method runs through
:func:`taskgrouping.experiment.run_experiment`, as ``taskgrouping run`` does. Writes
benchmarks/results/dmtg_digits.{json,md}.

    python benchmarks/bench_dmtg_digits.py [--seeds 0,1,2] [--epochs 5,20] [--options JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from taskgrouping.config import build_config
from taskgrouping.io import atomic_write_text

OUT = Path(__file__).resolve().parent / "results"
METHODS = ("naive_mtl", "random", "label_clusters", "dmtg")


def run(seed: int, epochs: int, options: dict) -> dict:
    from taskgrouping.experiment import run_experiment

    config = build_config(preset="digits", overrides=[f"methods=[{','.join(METHODS)}]", f"train.epochs={epochs}",
                                                      "train.progress=false", f"seed={seed}", "threads=1"])
    config["dmtg"] = dict(options)
    with tempfile.TemporaryDirectory(prefix="digits_") as out:
        summary = run_experiment(config, out, echo=lambda m: None)
    return {m: {"norm_gain_e": summary["methods"][m]["norm_gain_e"], "grouping": summary["methods"][m]["grouping"],
                "total_test_loss": summary["methods"][m]["total_test_loss"]} for m in METHODS}


def markdown(results: dict, options: dict) -> str:
    lines = ["# DMTG on sklearn digits (real data, no known grouping)", "",
             "Written by `python benchmarks/bench_dmtg_digits.py`. NormGain_E vs naive MTL (higher is better); "
             f"DMTG options: {json.dumps(options)}. The default recipe's run is longer by the epochs S is held "
             "(`add_hold_epochs`: 7 and 28 epochs where the others train 5 and 20; its cost against naive MTL's: "
             "dmtg_learning_total_cost.md).", "",
             "| epochs | seed | random | label_clusters | DMTG | DMTG's groups |", "|---|---|---|---|---|---|"]
    for epochs, seeds in results.items():
        for seed, r in seeds.items():
            groups = " ".join("{" + ", ".join(g) + "}" for g in r["dmtg"]["grouping"])
            lines.append(f"| {epochs} | {seed} | " + " | ".join(f"{r[m]['norm_gain_e']:+.4f}" for m in METHODS[1:])
                         + f" | {groups} |")
        means = [statistics.mean(r[m]["norm_gain_e"] for r in seeds.values()) for m in METHODS[1:]]
        lines.append(f"| {epochs} | mean | " + " | ".join(f"{v:+.4f}" for v in means) + " | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", default="5,20")
    ap.add_argument("--options", default="{}", help="DMTG options (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    options = json.loads(args.options)
    results: dict = {}
    for epochs in args.epochs.split(","):
        for seed in args.seeds.split(","):
            results.setdefault(epochs, {})[seed] = run(int(seed), int(epochs), options)
            print(epochs, seed, {m: round(v["norm_gain_e"], 4) for m, v in results[epochs][seed].items()}, flush=True)
    atomic_write_text(OUT / "dmtg_digits.json", json.dumps({"dmtg_options": options, "torch": torch.__version__,
                                                           "results": results}, indent=1))
    atomic_write_text(OUT / "dmtg_digits.md", markdown(results, options))


if __name__ == "__main__":
    main()
