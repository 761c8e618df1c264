"""Does DMTG learn the grouping, or confirm its start? (run by hand; not part of the tests)

For each preset and seed: naive MTL, single-task, the known grouping (``oracle``), the label-correlation
heuristic (``label_clusters``) and DMTG from three starts:

* ``default``: the recipe's own start (the default ``attribution`` recipe: a small random start, the
  same runs as ``random``; ``robust``: the label clusters for scalar tasks, a small random start otherwise);
* ``wrong``: the known grouping with the first task of the first group moved into the second group
  (``init=prior``, logits 3 / 0, e.g. MultiMNIST's ``left_even`` among the right digit's tasks);
* ``random``: a small random start (``init=noisy``).

A start "recovers" when the final grouping equals the known one. ``moved`` counts the tasks whose
branch (argmax of S) at the end differs from the start: the given prior, or else S after the first
epoch (what S's learning changed). The presets whose labels
hide the groups (planted_independent, multimnist_independent, multimnist_dense) tell learning apart from
the label heuristic; planted and multimnist are the earlier checks. Writes
benchmarks/results/dmtg_learning.{json,md}.

    python benchmarks/bench_dmtg_learning.py [--presets a,b] [--seeds 0,1,2,3,4] [--options JSON] [--tag NAME]
    python benchmarks/bench_dmtg_learning.py --cost   # step time of the mates pull (dmtg_learning_cost.*)
    python benchmarks/bench_dmtg_learning.py --total-cost   # whole-run time vs naive MTL (dmtg_learning_total_cost.*)
    python benchmarks/bench_dmtg_learning.py --noise-floor --seeds 0,...,9   # oracle vs oracle (dmtg_learning_noise_floor.*)

The held-out seeds' table (dmtg_learning_attribution_seeds5-9.*) is ``--presets
multimnist_independent,planted_independent,multimnist_dense --seeds 5,6,7,8,9 --starts random --tag
attribution_seeds5-9``. The recovery, noise-floor and total-cost tables keep the rows of the presets and
seeds a run does not name, so one preset can be measured again alone (``--presets multimnist_independent``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from taskgrouping.config import build_config
from taskgrouping.engine.driver import prepare_data
from taskgrouping.methods.base import MethodContext, available_methods
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.io import atomic_write_text

OUT = Path(__file__).resolve().parent / "results"
PRESETS = ("planted_independent", "multimnist_independent", "multimnist_dense", "multimnist", "planted")
BASELINES = ("naive_mtl", "single_task", "oracle", "label_clusters")
STARTS = ("default", "wrong", "random")
START_NAMES = {"default": "recipe's own start", "wrong": "wrong start", "random": "random start"}


def _canon(groups) -> list[list[str]]:
    return sorted(sorted(g) for g in groups)


def _wrong_prior(data, K: int) -> list[list[float]]:
    prior = [[0.0] * K for _ in data.task_names]
    for k, group in enumerate(data.groups):
        for t in group:
            prior[data.task_names.index(t)][k] = 3.0
    prior[data.task_names.index(data.groups[0][0])] = [3.0 if k == 1 else 0.0 for k in range(K)]
    return prior


def _setup(preset: str, seed: int) -> tuple[dict, object]:
    """The preset's config at ``seed`` and its data (the data depend on the seed); ``diabetes``: sklearn's
    diabetes table as bench_dmtg_real_data.py builds it (K = 3, default training settings)."""
    overrides = [f"seed={seed}", "train.progress=false"]
    if preset != "diabetes":
        cfg = build_config(preset=preset, overrides=overrides)
        return cfg, prepare_data(cfg)
    from bench_dmtg_real_data import diabetes_overrides

    with tempfile.TemporaryDirectory(prefix="diabetes_") as directory:
        cfg = build_config(overrides=overrides + diabetes_overrides(Path(directory)))
        return cfg, prepare_data(cfg)


def _context(cfg: dict, data, seed: int, method: str, options: dict) -> MethodContext:
    """A method's run on ``data`` with training seed ``seed`` (initialisation, batch order, Gumbel draws)."""
    return MethodContext(data=data, seed=seed, K=cfg["K"], train=TrainConfig(**cfg["train"]), model=cfg["model"],
                         balancer=cfg["balancer"], options=options, name=method)


def run_seed(preset: str, seed: int, dmtg_options: dict, baselines: dict | None = None,
             starts: tuple[str, ...] = STARTS) -> dict:
    cfg, data = _setup(preset, seed)
    methods = available_methods()
    out: dict = {}

    def run(name: str, method: str, options: dict) -> None:
        ctx = _context(cfg, data, seed, method, options)
        t0 = time.perf_counter()
        res = methods[method](ctx)
        rec = {"total_test_loss": sum(m["loss"] for m in res.per_task.values()),
               "grouping": res.grouping.as_lists(), "seconds": time.perf_counter() - t0,
               "recovered": _canon(res.grouping.groups) == _canon(data.groups)}
        if method == "dmtg":  # S's columns are the branches: compare each task's branch at the start and the end
            history = res.extra["dmtg_history"]
            start = options.get("prior") or (history[0]["assignment_probs"] if history else res.extra["S"])
            begin, end = torch.tensor(start).argmax(1), torch.tensor(res.extra["assignment_probs"]).argmax(1)
            rec["start_assignment"], rec["final_assignment"] = begin.tolist(), end.tolist()
            rec["moved"] = int((begin != end).sum())
            rec["best_epoch"] = res.extra["best_epoch"]
            rec["live_heads_final"] = res.extra["live_heads_final"]
        out[name] = rec

    if baselines is not None:  # the same runs, already measured (same preset, seed and code path)
        out.update({m: baselines[m] for m in BASELINES})
    else:
        for m in BASELINES:
            run(m, m, {})
    options = {"default": dict(dmtg_options),
               "wrong": dict(dmtg_options, init="prior", prior=_wrong_prior(data, cfg["K"])),
               "random": dict(dmtg_options, init="noisy")}
    for start in starts:
        run(f"dmtg_{start}", "dmtg", options[start])
    return out


def _starts(results: dict) -> list[str]:
    """The DMTG starts that were run (every seed of a file runs the same ones)."""
    first = next(iter(next(iter(results.values())).values()))
    return [s for s in STARTS if f"dmtg_{s}" in first]


def summarise(results: dict) -> dict:
    summary = {}
    for preset, seeds in results.items():
        oracle = {s: r["oracle"]["total_test_loss"] for s, r in seeds.items()}
        row = {"seeds": sorted(seeds, key=int),
               "label_clusters_recovered": sum(r["label_clusters"]["recovered"] for r in seeds.values())}
        for start in _starts(results):
            key = f"dmtg_{start}"
            ratios = [r[key]["total_test_loss"] / oracle[s] for s, r in seeds.items()]
            row[start] = {"recovered": sum(r[key]["recovered"] for r in seeds.values()),
                          "median_over_oracle": statistics.median(ratios),
                          "moved_tasks_mean": statistics.mean(r[key]["moved"] for r in seeds.values())}
        summary[preset] = row
    return summary


def markdown(results: dict, summary: dict, tag: str) -> str:
    starts = _starts(results)
    lines = ["# Does DMTG learn the grouping?", "",
             "Written by `python benchmarks/bench_dmtg_learning.py`. Recovered = final grouping equals the known "
             "one; loss = total test loss; moved = tasks whose branch (argmax S) at the end differs from the start "
             "(what S's learning changed). DMTG options: " + tag, "",
             "| preset | seeds | label_clusters recovered | "
             + " | ".join(f"DMTG from the {START_NAMES[s]}: recovered / median ÷ oracle / moved" for s in starts)
             + " |", "|---" * (3 + len(starts)) + "|"]
    for preset, row in summary.items():
        n = len(row["seeds"])
        cells = [f"{row[s]['recovered']}/{n} / {row[s]['median_over_oracle']:.3f} / {row[s]['moved_tasks_mean']:.1f}"
                 for s in starts]
        lines.append(f"| {preset} | {','.join(row['seeds'])} | {row['label_clusters_recovered']}/{n} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Per seed (total test loss; * = known grouping recovered):", ""]
    cols = BASELINES + tuple(f"dmtg_{s}" for s in starts)
    lines += ["| preset | seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for preset, seeds in results.items():
        for s in sorted(seeds, key=int):
            r = seeds[s]
            lines.append(f"| {preset} | {s} | " + " | ".join(
                f"{r[c]['total_test_loss']:.4f}{'*' if r[c]['recovered'] else ''}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def mates_cost(rounds: int = 15) -> list[dict]:
    """Median step time (interleaved blocks of 10 steps, one thread) of naive MTL, DMTG's learning step and the same
    with the mates pull measured every 5 / 10 steps or the attribution pull (the ``attribution`` recipe's) every 10, on the MultiMNIST CNN (N=8) and planted MLP (N=9)."""
    from bench_dmtg import _models, _step_fn, _time

    from taskgrouping.methods.dmtg import DMTGObjective, DMTGOptions
    from taskgrouping.tasks import Task
    from taskgrouping.engine.hooks import TaskLossObjective

    rows = []
    for name, backbone, options, shape, N, kind, bs, K in (
            ("multimnist-cnn", "small_cnn", {"channels": [16, 32], "feature_dim": 64}, (1, 28, 28), 8, "binary", 128, 2),
            ("planted-mlp", "mlp", {"widths": [32, 8]}, (128,), 9, "regression", 64, 3)):
        tasks = [Task(f"t{i}", kind) for i in range(N)]
        x = torch.randn(bs, *shape)
        y = {t.name: (torch.randint(0, 2, (bs,)) if kind == "binary" else torch.randn(bs, 1)) for t in tasks}
        naive, dmtg = _models(tasks, shape, K, backbone, options, 0)
        fns = {"naive": _step_fn(naive, TaskLossObjective(tasks), x, y)}
        for label, extra in (("dmtg", {}), ("mates_every_10", {"mates_weight": 10, "mates_every": 10}),
                             ("mates_every_5", {"mates_weight": 10, "mates_every": 5}),
                             ("attribution_every_10", {"attribution_weight": 20, "attribution_every": 10})):
            objective = DMTGObjective(tasks, DMTGOptions(**extra, s_warmup_epochs=0))
            objective.on_epoch_start(0, dmtg)
            fns[label] = _step_fn(dmtg, objective, x, y)
        t = _time(fns, rounds, 10)  # blocks of 10 steps: each holds 1 or 2 measuring steps
        rows.append({"setting": name, "K": K, "N": N, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                     **{f"{k}_over_K_plus_1_naive": v / ((K + 1) * t["naive"]) for k, v in t.items() if k != "naive"}})
    return rows


#: what a training seed alone moves: the known grouping trained again with the training seed shifted by this
NOISE_SEED_SHIFT = 1000


def noise_floor(presets: list[str], seeds: list[int], saved: dict | None = None) -> dict:
    """The known grouping (``oracle``) trained twice on the same data, with training seeds s and s + 1000
    (initialisation, batch order): the ratio of their total test losses is what the training seed alone moves,
    the floor under any "method ÷ oracle" ratio of the other tables."""
    oracle = available_methods()["oracle"]
    out: dict = saved or {}  # the rows of the other presets and seeds stay as they were measured
    for preset in presets:
        for seed in seeds:
            cfg, data = _setup(preset, seed)
            loss = [sum(m["loss"] for m in oracle(_context(cfg, data, seed + shift, "oracle", {})).per_task.values())
                    for shift in (0, NOISE_SEED_SHIFT)]
            out.setdefault(preset, {})[str(seed)] = {"oracle": loss[0], "oracle_reseeded": loss[1],
                                                     "ratio": loss[1] / loss[0]}
            print(preset, seed, out[preset][str(seed)], flush=True)
    return out


def noise_floor_markdown(floor: dict, dmtg_files: list[str]) -> str:
    """The floor's table, beside DMTG's random-start loss from ``dmtg_files`` (results of this benchmark)
    divided by the floor's own oracle run (the code of this run, where a file's baselines are older)."""
    dmtg: dict = {}
    for name in dmtg_files:
        for preset, seeds in json.loads((OUT / name).read_text())["results"].items():
            for s, r in seeds.items():
                if "dmtg_random" in r and s in floor.get(preset, {}):
                    dmtg.setdefault(preset, {})[s] = r["dmtg_random"]["total_test_loss"] / floor[preset][s]["oracle"]
    lines = ["# The training seed's noise floor under the \"÷ oracle\" ratios", "",
             noise_floor.__doc__.replace("\n    ", " "), "",
             f"DMTG (random start = the default recipe's own start) from {', '.join(dmtg_files)}.", "",
             "| preset | seeds | oracle reseeded ÷ oracle: median (min–max) | DMTG ÷ oracle: median (min–max) |",
             "|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})" if values else "–"

    for preset, seeds in floor.items():
        keys = sorted(seeds, key=int)
        for part in [keys[i:i + 5] for i in range(0, len(keys), 5)] + ([keys] if len(keys) > 5 else []):
            if part:
                lines.append(f"| {preset} | {part[0]}–{part[-1]} | {cell([seeds[s]['ratio'] for s in part])} | "
                             f"{cell([dmtg[preset][s] for s in part if s in dmtg.get(preset, {})])} |")
    lines += ["", "| preset | seed | oracle | oracle reseeded | ratio | DMTG ÷ oracle |", "|---|---|---|---|---|---|"]
    for preset, seeds in floor.items():
        for s in sorted(seeds, key=int):
            r, d = seeds[s], dmtg.get(preset, {}).get(s)
            lines.append(f"| {preset} | {s} | {r['oracle']:.4f} | {r['oracle_reseeded']:.4f} | {r['ratio']:.3f} | "
                         + (f"{d:.3f}" if d is not None else "–") + " |")
    return "\n".join(lines) + "\n"


COST_PRESETS = ("multimnist", "multimnist_independent", "planted", "planted_independent", "diabetes")


def total_cost(presets: tuple[str, ...] = COST_PRESETS, seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
               saved: list[dict] | None = None) -> list[dict]:
    """Whole-run training seconds of the default DMTG recipe and of naive MTL on the same data (one thread,
    alternating in one process): MultiMNIST (K=2, a fixed 8 epochs, DMTG's run longer by its 3 held epochs),
    multimnist_independent (K=2, early stopping after 4 epochs without improvement, at most 30), planted and
    planted_independent (K=3, early stopping after 10; DMTG's held epochs do not count towards it), and sklearn's
    diabetes table (K=3, a fixed 20 epochs of 3 steps, DMTG's run longer by its 8 held epochs and by those added
    until S has converged)."""
    methods = available_methods()
    rows = [r for r in saved or [] if (r["preset"], r["seed"]) not in {(p, s) for p in presets for s in seeds}]
    for preset in presets:
        for seed in seeds:
            cfg, data = _setup(preset, seed)
            seconds = {}
            for method in ("naive_mtl", "dmtg"):
                res = methods[method](_context(cfg, data, seed, method, {}))
                seconds[method] = res.train_seconds
                if method == "dmtg":
                    epochs = len(res.extra["dmtg_history"])
                else:
                    naive_epochs = res.extra["epochs_run"]
            rows.append({"preset": preset, "seed": seed, "K": cfg["K"], "naive_s": seconds["naive_mtl"],
                         "dmtg_s": seconds["dmtg"], "naive_epochs": naive_epochs, "dmtg_epochs": epochs,
                         "dmtg_over_K_plus_1_naive": seconds["dmtg"] / ((cfg["K"] + 1) * seconds["naive_mtl"])})
            print(rows[-1], flush=True)
    order = {p: i for i, p in enumerate(COST_PRESETS)}
    return sorted(rows, key=lambda r: (order.get(r["preset"], len(order)), r["seed"]))


def total_cost_markdown(rows: list[dict]) -> str:
    return ("# DMTG's whole-run training time vs naive MTL\n\n" + total_cost.__doc__.replace("\n    ", " ")
            + " Target: <= (K + 1) x naive MTL.\n\n| preset | seed | K | naive MTL s | DMTG s | naive MTL epochs | "
            "DMTG epochs | DMTG ÷ ((K+1) × naive) |\n|---|---|---|---|---|---|---|---|\n"
            + "".join(f"| {r['preset']} | {r['seed']} | {r['K']} | {r['naive_s']:.2f} | {r['dmtg_s']:.2f} | "
                      f"{r['naive_epochs']} | {r['dmtg_epochs']} | {r['dmtg_over_K_plus_1_naive']:.2f} |\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=None, help="comma-separated (default: every preset of the chosen table); "
                    "the rows of other presets and seeds in an existing result file are kept")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--options", default="{}", help="DMTG options (JSON) for every DMTG run")
    ap.add_argument("--tag", default="", help="suffix of the result files (dmtg_learning_TAG.*)")
    ap.add_argument("--reuse-baselines", action="store_true",
                    help="take naive / STL / oracle / label_clusters from dmtg_learning.json instead of rerunning")
    ap.add_argument("--starts", default=",".join(STARTS), help="DMTG starts to run (default, wrong, random)")
    ap.add_argument("--cost", action="store_true", help="only the step-time part (dmtg_learning_cost.*)")
    ap.add_argument("--total-cost", action="store_true",
                    help="only the whole-run training time vs naive MTL (dmtg_learning_total_cost.*)")
    ap.add_argument("--noise-floor", action="store_true",
                    help="only the oracle trained again with another training seed (dmtg_learning_noise_floor.*)")
    ap.add_argument("--dmtg-results", default="dmtg_learning_attribution.json,dmtg_learning_attribution_seeds5-9.json",
                    help="with --noise-floor: result files (comma-separated) whose DMTG random-start ratios go beside it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    presets = (args.presets or ",".join(PRESETS)).split(",")
    if args.noise_floor:
        path = OUT / "dmtg_learning_noise_floor.json"
        floor = noise_floor(presets, [int(s) for s in args.seeds.split(",")],
                            json.loads(path.read_text()) if path.exists() else None)
        atomic_write_text(OUT / "dmtg_learning_noise_floor.json", json.dumps(floor, indent=1))
        atomic_write_text(OUT / "dmtg_learning_noise_floor.md", noise_floor_markdown(floor, args.dmtg_results.split(",")))
        return
    if args.total_cost:
        path = OUT / "dmtg_learning_total_cost.json"
        rows = total_cost(tuple(args.presets.split(",")) if args.presets else COST_PRESETS,
                          tuple(int(s) for s in args.seeds.split(",")),
                          json.loads(path.read_text()) if path.exists() else None)
        atomic_write_text(OUT / "dmtg_learning_total_cost.json", json.dumps(rows, indent=1))
        atomic_write_text(OUT / "dmtg_learning_total_cost.md", total_cost_markdown(rows))
        return
    if args.cost:
        rows = mates_cost()
        atomic_write_text(OUT / "dmtg_learning_cost.json", json.dumps(rows, indent=1))
        keys = list(rows[0])
        atomic_write_text(OUT / "dmtg_learning_cost.md", "# DMTG step time with the mates and attribution pulls\n\n"
                          "Median over interleaved blocks of 10 steps (so each includes the measuring steps), one thread; target <= (K + 1) x naive MTL.\n\n"
                          + "| " + " | ".join(keys) + " |\n" + "|---" * len(keys) + "|\n"
                          + "".join("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k])
                                                        for k in keys) + " |\n" for r in rows))
        print(json.dumps(rows))
        return
    stem = "dmtg_learning" + (f"_{args.tag}" if args.tag else "")
    path = OUT / f"{stem}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    results = saved.get("results", {})
    options = json.loads(args.options)
    reference = json.loads((OUT / "dmtg_learning.json").read_text())["results"] if args.reuse_baselines else {}
    for preset in presets:
        for seed in (int(s) for s in args.seeds.split(",")):
            base = reference[preset][str(seed)] if args.reuse_baselines else None
            results.setdefault(preset, {})[str(seed)] = run_seed(preset, seed, options, base,
                                                                 tuple(args.starts.split(",")))
            print(preset, seed, {k: (round(v["total_test_loss"], 4), v["recovered"])
                                 for k, v in results[preset][str(seed)].items()}, flush=True)
            summary = summarise(results)
            atomic_write_text(path, json.dumps({"dmtg_options": options, "summary": summary, "results": results},
                                               indent=1))
            atomic_write_text(OUT / f"{stem}.md", markdown(results, summary, json.dumps(options) or "{}"))
    print(json.dumps(summarise(results)))


if __name__ == "__main__":
    main()
