"""DMTG on real data without a known grouping (run by hand; not part of the tests).

Two real datasets this offline project can read from scikit-learn, where nothing says which grouping is
right, so the check is the one a user would make: the gain vs naive MTL of the default DMTG recipe beside
one random grouping and ``label_clusters``, seeds 0-2 (and 3-4 for the table), each method run through
:func:`taskgrouping.experiment.run_experiment` as ``taskgrouping run`` does:

* ``digits``: the preset (8x8 images, 4 binary tasks of the digit - even, greater than 4, has a loop,
  prime - K = 2, MLP), NormGain_E, at the preset's 5 epochs (every method still improving) and at 20;
* ``diabetes``: sklearn's diabetes table (442 patients) as a user's table of assays: the six blood serum
  measurements and the disease progression, each standardised, predicted from age, sex, BMI and blood
  pressure (7 regression tasks, K = 3, ``data.name=table``, its seeded 60/20/20 split), NormGain_L, at
  the default 20 epochs (3 steps an epoch, so S has few steps to learn in: DMTG's run is extended until S
  has converged, and trains more epochs than the others) and at 60 (every method longer).

Writes benchmarks/results/dmtg_real_data.{json,md}.

    python benchmarks/bench_dmtg_real_data.py [--datasets digits,diabetes] [--options JSON]
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
DIABETES_TARGETS = ("s1", "s2", "s3", "s4", "s5", "s6", "progression")
#: dataset -> (settings as (epochs, seeds), gain reported)
SETTINGS = {"digits": ([(5, (0, 1, 2)), (20, (0, 1, 2))], "norm_gain_e"),
            "diabetes": ([(20, (0, 1, 2, 3, 4)), (60, (0, 1, 2, 3, 4))], "norm_gain_l")}


def diabetes_overrides(directory: Path) -> list[str]:
    """Config overrides for sklearn's diabetes data as a wide table written to ``directory`` (the inputs as
    given, the 7 targets standardised), K = 3."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={"target": "progression"})
    for column in DIABETES_TARGETS:
        frame[column] = (frame[column] - frame[column].mean()) / frame[column].std()
    path = directory / "diabetes.csv"
    frame.to_csv(path, index=False)
    return ["data.name=table", f"data.path={path}", f"data.targets=[{','.join(DIABETES_TARGETS)}]", "K=3"]


def run(dataset: str, seed: int, epochs: int, options: dict, gain: str) -> dict:
    from taskgrouping.experiment import run_experiment

    overrides = [f"methods=[{','.join(METHODS)}]", f"train.epochs={epochs}", "train.progress=false", f"seed={seed}",
                 "threads=1"]
    with tempfile.TemporaryDirectory(prefix=f"{dataset}_") as out:
        if dataset == "digits":
            config = build_config(preset="digits", overrides=overrides)
        else:
            config = build_config(overrides=overrides + diabetes_overrides(Path(out)))
        config["dmtg"] = dict(options)
        summary = run_experiment(config, Path(out) / "run", echo=lambda m: None)
    dmtg = summary["methods"]["dmtg"]
    return {"methods": {m: {"gain": summary["methods"][m][gain], "grouping": summary["methods"][m]["grouping"],
                            "total_test_loss": summary["methods"][m]["total_test_loss"]} for m in METHODS},
            "dmtg_epochs_run": dmtg["epochs_run"], "dmtg_epochs_added": dmtg["epochs_added"],
            "dmtg_s_converged_epoch": dmtg["s_converged_epoch"]}


def markdown(results: dict, options: dict) -> str:
    lines = ["# DMTG on real data without a known grouping", "",
             "Written by `python benchmarks/bench_dmtg_real_data.py` (its docstring describes the data). Gain vs "
             "naive MTL (higher is better): NormGain_E on digits, NormGain_L on diabetes (regression). DMTG "
             f"options: {json.dumps(options)}. DMTG's run is longer by the epochs S is held (`add_hold_epochs`) and "
             "by those added while S had not converged (`converge_extension`): its epochs are in the table; its "
             "cost against naive MTL's on the presets: dmtg_learning_total_cost.md.", "",
             "| data | epochs | seed | random | label_clusters | DMTG | DMTG epochs (added) | S converged | "
             "DMTG's groups |", "|---|---|---|---|---|---|---|---|---|"]
    for dataset, settings in results.items():
        for epochs, seeds in settings.items():
            for seed, r in seeds.items():
                m = r["methods"]
                groups = " ".join("{" + ", ".join(g) + "}" for g in m["dmtg"]["grouping"])
                converged = "no" if r["dmtg_s_converged_epoch"] is None else f"epoch {r['dmtg_s_converged_epoch']}"
                lines.append(f"| {dataset} | {epochs} | {seed} | "
                             + " | ".join(f"{m[k]['gain']:+.4f}" for k in METHODS[1:])
                             + f" | {r['dmtg_epochs_run']} ({r['dmtg_epochs_added']}) | {converged} | {groups} |")
            first_three = list(seeds)[:3]  # the check's "mean of 3 seeds", then every seed's mean if more
            for chosen in [first_three] + ([list(seeds)] if len(seeds) > 3 else []):
                means = [statistics.mean(seeds[s]["methods"][k]["gain"] for s in chosen) for k in METHODS[1:]]
                lines.append(f"| {dataset} | {epochs} | mean of seeds {chosen[0]}-{chosen[-1]} | "
                             + " | ".join(f"{v:+.4f}" for v in means) + " | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(SETTINGS))
    ap.add_argument("--options", default="{}", help="DMTG options (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    options = json.loads(args.options)
    results: dict = {}
    for dataset in args.datasets.split(","):
        settings, gain = SETTINGS[dataset]
        for epochs, seeds in settings:
            for seed in seeds:
                r = run(dataset, seed, epochs, options, gain)
                results.setdefault(dataset, {}).setdefault(str(epochs), {})[str(seed)] = r
                print(dataset, epochs, seed, {m: round(v["gain"], 4) for m, v in r["methods"].items()}, flush=True)
    atomic_write_text(OUT / "dmtg_real_data.json", json.dumps({"dmtg_options": options, "torch": torch.__version__,
                                                              "results": results}, indent=1))
    atomic_write_text(OUT / "dmtg_real_data.md", markdown(results, options))


if __name__ == "__main__":
    main()
