"""MTG-Net in oracle mode on the authors' measured gains: quality against HOA and random acquisition.

Writes ``benchmarks/results/mtgnet.json`` and ``benchmarks/results/mtgnet.md``.

* MIMIC-III-27 (3,185 measured combinations): groups are chosen on validation gains among the
  measured combinations (overlap allowed, each task served by its best chosen group — the authors'
  setting) and scored on the measured *test* gains. Equal budget: HOA needs 27 singles + 351 pairs =
  378 trainings; MTG-Net trains 27 singles + the all-task set + 350 acquisitions = 378.
* Taskonomy-5 / ETTm1-7 (every combination measured): a partition into <= K groups with the paper's
  budget of N(N-1)/2 acquisitions; how often the measured-best partition is found over seeds 0-39,
  for the defaults and with the paper's initial design or acquisition rule instead.

Usage: ``python benchmarks/bench_mtgnet.py [--quick]`` (``--quick``: MIMIC with one seed and no one-pick
schedule, seeds 0-9 on the small tables).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from taskgrouping.methods.mtg_net import (
    MTGNetConfig,
    active_sampling,
    grouping_gain,
    load_mtgnet_gains,
    mtgnet_search,
    search_from_sampling,
    search_groups,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1] / "shared" / "grouping-data" / "mtg_net" / "collected_gain"
SMALL = dict(dim=16, layers=1, epochs=15, warm_start=True, ensemble=1, weight_decay=5e-4, acquisition="active")


def mimic(seeds: list[int], one_pick: bool) -> dict:
    valid = load_mtgnet_gains(ROOT, "mimic27", "valid")
    test = load_mtgnet_gains(ROOT, "mimic27", "test")
    ks = [2, 3, 4, 5]
    rows: list[dict] = []

    def score(name: str, groupings: dict[int, object], seconds: float | None, budget: int | str) -> None:
        rows.append({"method": name, "budget": budget, "seconds": seconds,
                     "test_gain": {k: round(grouping_gain(test, g), 4) for k, g in groupings.items()},
                     "valid_gain": {k: round(grouping_gain(valid, g), 4) for k, g in groupings.items()}})

    best_test = {k: search_groups(test.tasks, test.masks, test.gains, k, overlap=True) for k in ks}
    score("measured test gains (upper bound)", best_test, None, 3185)
    best_valid = {k: search_groups(valid.tasks, valid.masks, valid.gains, k, overlap=True) for k in ks}
    score("measured validation gains, all combinations", best_valid, None, 3185)
    for kind in ("hoa", "taghoa"):
        est = load_mtgnet_gains(ROOT, "mimic27", kind)
        score(f"{kind.upper()} estimates", {k: search_groups(est.tasks, est.masks, est.gains, k, overlap=True)
                                            for k in ks}, None, 378 if kind == "hoa" else "n/a")

    settings = [("MTG-Net, 50 picks/retraining", dict(picks_per_round=50), seeds),
                ("random acquisition", dict(acquisition="random"), seeds)]
    if one_pick:
        settings.insert(0, ("MTG-Net, 1 pick/retraining (paper schedule)", dict(picks_per_round=1), seeds[:1]))
    for name, extra, run_seeds in settings:
        for seed in run_seeds:
            cfg = MTGNetConfig(rounds=350, seed=seed, **{**SMALL, **extra})
            t0 = time.perf_counter()
            res = active_sampling(valid.tasks, valid, valid.masks, cfg)
            seconds = time.perf_counter() - t0
            score(f"{name}, hybrid gains, seed {seed}",
                  {k: search_from_sampling(res, k, valid.masks, overlap=True) for k in ks}, round(seconds, 1),
                  res.n_sampled)
            if "MTG-Net" in name:
                score(f"{name}, predicted gains only, seed {seed}",
                      {k: search_from_sampling(res, k, valid.masks, overlap=True, gain_source="predicted")
                       for k in ks}, round(seconds, 1), res.n_sampled)
    return {"setting": "MIMIC-III-27, select on validation, score on test, overlap, K groups", "rows": rows}


SMALL_SETTINGS = {
    "defaults (challenger acquisition, leave-one-out design where it fits)": {},
    "defaults but the paper's initial design (singles + all-task set only)": dict(initial="paper"),
    "defaults but the paper's acquisition rule": dict(acquisition="active"),
}


def small(dataset: str, select: str, report: list[str], seeds: list[int]) -> dict:
    sel = load_mtgnet_gains(ROOT, dataset, select)
    tables = {r: load_mtgnet_gains(ROOT, dataset, r) for r in report}
    hoa = load_mtgnet_gains(ROOT, dataset, "hoa")
    n = sel.n_tasks
    out = {"dataset": dataset, "select_on": select, "budget": n + 1 + n * (n - 1) // 2, "seeds": seeds,
           "settings": {}}
    for name, extra in SMALL_SETTINGS.items():
        block: dict = {"config": extra, "by_k": {}, "seconds_per_run": []}
        for k in (2, 3):
            best = search_groups(sel.tasks, sel.masks, sel.gains, k)
            g_hoa = search_groups(hoa.tasks, hoa.masks, hoa.gains, k)
            found = []
            for seed in seeds:
                t0 = time.perf_counter()
                found.append(mtgnet_search(None, sel, k, config=MTGNetConfig(seed=seed, **extra)))
                block["seconds_per_run"].append(time.perf_counter() - t0)
            hits = [bool(grouping_gain(sel, g) >= best.info["objective"] - 1e-9) for g in found]
            block["by_k"][k] = {
                "best_partition": [list(g) for g in best.groups],
                "best_gain": {r: round(grouping_gain(t, best), 4) for r, t in tables.items()},
                "hoa_gain": {r: round(grouping_gain(t, g_hoa), 4) for r, t in tables.items()},
                "mtgnet_hits": sum(hits), "mtgnet_hits_seeds_0_4": sum(hits[:5]), "hit_per_seed": hits,
                "mtgnet_gain_mean": {r: round(float(np.mean([grouping_gain(t, g) for g in found])), 4)
                                     for r, t in tables.items()},
                "mtgnet_gain_per_seed": {r: [round(grouping_gain(t, g), 4) for g in found] for r, t in tables.items()},
            }
        block["seconds_per_run"] = round(float(np.mean(block["seconds_per_run"])), 1)
        out["settings"][name] = block
    return out


def markdown(result: dict) -> str:
    lines = ["# MTG-Net (oracle mode) on the authors' measured gains", "",
             f"Machine: {result['machine']}; torch {result['torch']}, 1 thread. Times are wall seconds of active "
             "sampling on a shared 2-core machine (indicative only).", "",
             "## MIMIC-III-27: total measured test gain of the chosen groups (higher is better)", "",
             "| method | trained combos | K=2 | K=3 | K=4 | K=5 | seconds |", "|---|---|---|---|---|---|---|"]
    for row in result["mimic"]["rows"]:
        t = row["test_gain"]
        lines.append(f"| {row['method']} | {row['budget']} | {t[2]} | {t[3]} | {t[4]} | {t[5]} | "
                     f"{row['seconds'] if row['seconds'] is not None else ''} |")
    lines += ["", "## Taskonomy-5 / ETTm1-7: partitions, paper budget N(N-1)/2 acquisitions", "",
              "| dataset | setting | K | best partition (measured) | best gain | HOA gain | MTG-Net hits (seeds 0-4; all) | "
              "MTG-Net mean gain | seconds/run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in result["small"]:
        first = d["select_on"]
        for name, block in d["settings"].items():
            for k, v in block["by_k"].items():
                best = " ".join("{" + ",".join(g) + "}" for g in v["best_partition"])
                lines.append(f"| {d['dataset']} (select {first}) | {name} | {k} | {best} | {v['best_gain']} | "
                             f"{v['hoa_gain']} | {v['mtgnet_hits_seeds_0_4']} / 5; {v['mtgnet_hits']} / {len(d['seeds'])} | {v['mtgnet_gain_mean']} | "
                             f"{block['seconds_per_run']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "mimic": mimic(seeds, one_pick=not args.quick),
        "small": [small("taskonomy", "measured", ["measured"], list(range(10 if args.quick else 40))),
                  small("ETTm1", "valid", ["valid", "test"], list(range(10 if args.quick else 40)))],
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "mtgnet.json").write_text(json.dumps(result, indent=1))
    (out / "mtgnet.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
