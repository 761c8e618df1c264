"""DMTG cost benchmarks (run by hand; not part of the tests).

1. Step time of DMTG / (K x naive-MTL step time), K = 2..5, with and without shared blocks: steps
   that learn S, and (extra column) the warm-up steps while S is held fixed.
2. Step time at N = 40 / N = 9 tasks, K = 5 (planted MLP shapes and CelebA-like TAG-ResNet shapes).
3. Live heads at the end of training / N with head pruning on, and test loss with pruning vs without
   (planted and MultiMNIST, seeds 0-4).
4. The planted acceptance runs (naive MTL / single-task / oracle / DMTG total test loss, seeds 0-4) and
   how much of DMTG - oracle is initialisation luck: for each data seed, the oracle and DMTG are
   trained from several initialisations (run seeds 1000 * data seed + j, same data) and their
   means compared.
5. Other configurations (unequal planted groups, K = 2, 4, 5, classification, more data, more noise,
   less similar group-mates, MultiMNIST): naive MTL / single-task / oracle / DMTG, seeds 0-2.
6. MultiMNIST at K = 2, 3, 4: NormGain_E vs naive MTL of DMTG and of random grouping, seeds 0-4 (the
   issue's check: the mean over seeds 0-2).

Timings are medians over interleaved rounds in one process (the machine is shared and noisy), one
CPU thread. Part 1 interleaves single steps (120 rounds): with blocks of 20 steps per variant the
DMTG / K x naive ratio moved by up to 0.15 between repeated runs on this machine. Writes
benchmarks/results/dmtg.json and dmtg.md.

    python benchmarks/bench_dmtg.py [--quick] [--parts steps,n,heads,planted,configs,multimnist_k]
                                    [--options JSON --tag NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from taskgrouping.config import build_config
from taskgrouping.engine.driver import prepare_data
from taskgrouping.metrics import norm_gain
from taskgrouping.methods.base import MethodContext, available_methods
from taskgrouping.methods.dmtg import DMTGModel, DMTGObjective, DMTGOptions
from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task
from taskgrouping.engine.hooks import TaskLossObjective
from taskgrouping.engine.trainer import TrainConfig, make_optimizer
from taskgrouping.io import atomic_write_text

OUT = Path(__file__).resolve().parent / "results"
DMTG_OPTIONS: dict = {}  # --options: DMTG options for the quality parts (heads, planted, configs, multimnist_k)
WARMUP_EPOCHS = DMTGOptions().s_warmup_epochs


def _dmtg_step_fn(model, tasks, x, y, warm_up: bool = False):
    """A step of the default recipe in a warm-up epoch (S fixed) or in an epoch that learns S."""
    objective = DMTGObjective(tasks, DMTGOptions())
    objective.on_epoch_start(0 if warm_up else WARMUP_EPOCHS, model)
    return _step_fn(model, objective, x, y)


def _step_fn(model, objective, x, y):
    groups = objective.param_groups(model) if hasattr(objective, "param_groups") else [
        {"params": list(model.parameters())}]
    opt = make_optimizer(TrainConfig(lr=1e-3), groups)

    def step():
        out = objective(model, x, y)
        opt.zero_grad(set_to_none=True)
        torch.stack(list(out.losses.values())).sum().backward()
        opt.step()
    return step


def _time(fns: dict[str, callable], rounds: int, steps: int) -> dict[str, float]:
    for f in fns.values():
        for _ in range(3):
            f()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():  # interleaved: every round times every variant
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            samples[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def _models(tasks, input_shape, K, backbone, options, shared_blocks):
    names = [t.name for t in tasks]
    torch.manual_seed(0)
    naive = build_branched_model(tasks, [names], input_shape, backbone=backbone, backbone_options=options,
                                 shared_blocks=shared_blocks)
    net = build_branched_model(tasks, [names] * K, input_shape, backbone=backbone, backbone_options=options,
                               shared_blocks=shared_blocks)
    # tasks spread over the branches, as a prior would: in a warm-up step only assigned heads reach a branch
    s = torch.zeros(len(names), K)
    s[torch.arange(len(names)), torch.arange(len(names)) % K] = 3.0
    dmtg = DMTGModel(net, names, s, "intended")
    return naive, dmtg


def step_ratio(quick: bool) -> list[dict]:
    rows = []
    settings = [("planted-mlp", "mlp", {"widths": [64, 12]}, (32,), 9, "regression", 64),
                ("multimnist-cnn", "small_cnn", {"channels": [16, 32], "feature_dim": 64}, (1, 28, 28), 8, "binary", 128)]
    for name, backbone, options, shape, N, kind, bs in settings:
        tasks = [Task(f"t{i}", kind) for i in range(N)]
        x = torch.randn(bs, *shape)
        y = {t.name: (torch.randint(0, 2, (bs,)) if kind == "binary" else torch.randn(bs, 1)) for t in tasks}
        for shared in (0, 1):
            for K in (2, 3, 4, 5):
                naive, dmtg = _models(tasks, shape, K, backbone, options, shared)
                fns = {"naive": _step_fn(naive, TaskLossObjective(tasks), x, y),
                       "dmtg": _dmtg_step_fn(dmtg, tasks, x, y),
                       "dmtg_warmup": _dmtg_step_fn(dmtg, tasks, x, y, warm_up=True)}
                t = _time(fns, 20 if quick else 120, 1)
                rows.append({"setting": name, "shared_blocks": shared, "K": K, "naive_ms": t["naive"] * 1e3,
                             "dmtg_ms": t["dmtg"] * 1e3, "ratio_vs_K_naive": t["dmtg"] / (K * t["naive"]),
                             "dmtg_warmup_ms": t["dmtg_warmup"] * 1e3,
                             "warmup_ratio_vs_K_naive": t["dmtg_warmup"] / (K * t["naive"])})
                print(rows[-1], flush=True)
    return rows


def n_ratio(quick: bool) -> list[dict]:
    rows = []
    for name, backbone, options, shape, bs in (("planted-mlp", "mlp", {"widths": [64, 12]}, (32,), 64),
                                               ("celeba-like tag_resnet", "tag_resnet", {}, (3, 64, 64), 32)):
        fns = {}
        for N in (9, 40):
            kind = "regression" if name.startswith("planted") else "binary"
            tasks = [Task(f"t{i}", kind) for i in range(N)]
            x = torch.randn(bs, *shape)
            y = {t.name: (torch.randint(0, 2, (bs,)) if kind == "binary" else torch.randn(bs, 1)) for t in tasks}
            _, dmtg = _models(tasks, shape, 5, backbone, options, 0)
            fns[N] = _dmtg_step_fn(dmtg, tasks, x, y)
        t = _time(fns, 5 if quick else 9, 5 if quick else 10)
        rows.append({"setting": name, "K": 5, "n9_ms": t[9] * 1e3, "n40_ms": t[40] * 1e3, "ratio": t[40] / t[9]})
        print(rows[-1], flush=True)
    return rows


def live_heads(quick: bool) -> list[dict]:
    rows = []
    seeds = (0,) if quick else (0, 1, 2, 3, 4)
    runs = [(preset, s, []) for preset in ("planted", "multimnist") for s in seeds]
    for preset, seed, extra in runs:
        cfg = build_config(preset=preset, overrides=[f"seed={seed}", "train.progress=false", *extra])
        data = prepare_data(cfg)
        out = {}
        for pruning in (True, False):
            r = _run("dmtg", data, cfg, seed, head_pruning=pruning)
            out[pruning] = (r.extra["live_heads_final"], sum(m["loss"] for m in r.per_task.values()))
        N = len(data.tasks)
        rows.append({"preset": preset, "seed": seed, "N": N, "K": cfg["K"], "live_heads": out[True][0],
                     "live_over_N": out[True][0] / N, "test_loss_pruning": out[True][1],
                     "test_loss_no_pruning": out[False][1]})
        print(rows[-1], flush=True)
    return rows


def _total(result) -> float:
    return float(sum(m["loss"] for m in result.per_task.values()))


def _run(name: str, data, cfg: dict, seed: int, cache: dict | None = None, **options):
    """One method on prepared data; DMTG gets the --options, then ``options``."""
    ctx = MethodContext(data=data, seed=seed, K=cfg["K"], train=TrainConfig(**cfg["train"]), model=cfg["model"],
                        balancer=cfg["balancer"], options={**DMTG_OPTIONS, **options} if name == "dmtg" else {},
                        name=name, cache={} if cache is None else cache)
    return available_methods()[name](ctx)


def planted_runs(quick: bool, inits: int = 6) -> dict:
    """Seeds 0-4 of the planted preset as the DMTG issue checks them, plus the init spread (see docstring)."""
    rows, spread = [], []
    for seed in ((0,) if quick else (0, 1, 2, 3, 4)):
        cfg = build_config(preset="planted", overrides=[f"seed={seed}", "train.progress=false"])
        data = prepare_data(cfg)

        def run(name: str, run_seed: int, cache: dict) -> float:
            return _total(_run(name, data, cfg, run_seed, cache))

        cache: dict = {}
        row = {"seed": seed, **{m: run(m, seed, cache) for m in ("naive_mtl", "single_task", "oracle", "dmtg")}}
        row["dmtg_vs_oracle"] = row["dmtg"] / row["oracle"] - 1
        rows.append(row)
        print(row, flush=True)
        draws = {m: [run(m, 1000 * seed + j, {}) for j in range(2 if quick else inits)] for m in ("oracle", "dmtg")}
        spread.append({"seed": seed, "draws": draws,
                       **{f"{m}_mean": statistics.mean(v) for m, v in draws.items()},
                       **{f"{m}_sd": statistics.stdev(v) for m, v in draws.items()},
                       "mean_dmtg_vs_oracle": statistics.mean(draws["dmtg"]) / statistics.mean(draws["oracle"]) - 1})
        print(spread[-1], flush=True)
    return {"runs": rows, "spread": spread, "inits": 2 if quick else inits}


CONFIGS = {  # beyond the preset: unequal planted groups, more groups, and real data with a known grouping
    "planted, groups 5+3+2, K=3": ("planted", ["data.n_tasks=10", "data.group_sizes=[5,3,2]"]),
    "planted, groups 3+3+3+3, K=4": ("planted", ["data.n_tasks=12", "data.group_sizes=[3,3,3,3]", "K=4"]),
    "multimnist, K=2": ("multimnist", []),
    "planted, groups 4+4, K=2": ("planted", ["data.n_tasks=8", "data.group_sizes=[4,4]", "K=2"]),
    "planted, groups 2+2+2+2+2, K=5": ("planted", ["data.n_tasks=10", "data.group_sizes=[2,2,2,2,2]", "K=5"]),
    "planted, classification": ("planted", ["data.task_type=classification"]),
    "planted, 2000 training samples": ("planted", ["data.n_train=2000"]),
    "planted, noise 2": ("planted", ["data.noise=2.0"]),
    "planted, group-mate similarity 0.4": ("planted", ["data.within_group_similarity=0.4"]),
}


def config_runs(quick: bool) -> list[dict]:
    """Total test loss (and error where the tasks have one) of naive MTL / single-task / oracle / DMTG on
    configurations other than the planted preset, seeds 0-2."""
    rows = []
    for name, (preset, extra) in CONFIGS.items():
        for seed in ((0,) if quick else (0, 1, 2)):
            cfg = build_config(preset=preset, overrides=[f"seed={seed}", "train.progress=false", *extra])
            data = prepare_data(cfg)
            row: dict = {"config": name, "seed": seed}
            for m in ("naive_mtl", "single_task", "oracle", "dmtg"):
                r = _run(m, data, cfg, seed)
                row[m] = _total(r)
                if all("error" in v for v in r.per_task.values()):
                    row[f"{m}_error"] = float(sum(v["error"] for v in r.per_task.values()))
                if m == "dmtg":
                    row["dmtg_found_oracle"] = sorted(map(sorted, r.grouping.groups)) == sorted(
                        map(sorted, data.groups))
            row["dmtg_vs_oracle"] = row["dmtg"] / row["oracle"] - 1
            rows.append(row)
            print(row, flush=True)
    return rows


def multimnist_k(quick: bool) -> list[dict]:
    """NormGain_E vs naive MTL of DMTG and of one random grouping at K = 2, 3, 4 on MultiMNIST."""
    rows = []
    for K in ((2,) if quick else (2, 3, 4)):
        for seed in ((0,) if quick else (0, 1, 2, 3, 4)):
            cfg = build_config(preset="multimnist", overrides=[f"seed={seed}", f"K={K}", "train.progress=false"])
            data = prepare_data(cfg)
            res = {m: _run(m, data, cfg, seed) for m in ("naive_mtl", "random", "dmtg")}
            rows.append({"K": K, "seed": seed, "dmtg_groups": res["dmtg"].grouping.as_lists(),
                         "random_groups": res["random"].grouping.as_lists(),
                         **{f"{m}_normgain_e": norm_gain(res[m].per_task, res["naive_mtl"].per_task, "error")
                            for m in ("dmtg", "random")}})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="steps,n,heads,planted,configs,multimnist_k")
    ap.add_argument("--options", default="{}", help="DMTG options (JSON) for the quality parts, e.g. "
                    "'{\"warmup\": \"gumbel\"}'; results then go to dmtg_<--tag>.json/.md")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    DMTG_OPTIONS.update(json.loads(args.options))
    if DMTG_OPTIONS and not args.tag:
        ap.error("--options needs a --tag, so that the default results are not overwritten")
    stem = f"dmtg_{args.tag}" if args.tag else "dmtg"
    previous = OUT / f"{stem}.json"  # a partial run keeps the other parts' last results
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    result.update(threads=1, torch=torch.__version__, dmtg_options=DMTG_OPTIONS)
    if "steps" in parts:
        result["step_ratio"] = step_ratio(args.quick)
    if "n" in parts:
        result["n_ratio"] = n_ratio(args.quick)
    if "heads" in parts:
        result["live_heads"] = live_heads(args.quick)
    if "planted" in parts:
        result["planted"] = planted_runs(args.quick)
    if "configs" in parts:
        result["configs"] = config_runs(args.quick)
    if "multimnist_k" in parts:
        result["multimnist_k"] = multimnist_k(args.quick)
    OUT.mkdir(exist_ok=True)
    atomic_write_text(OUT / f"{stem}.json", json.dumps(result, indent=1))
    lines = ["# DMTG benchmarks", "", f"DMTG options beyond the default recipe: {json.dumps(DMTG_OPTIONS)}", ""]
    if "step_ratio" in result:
        lines += ["## Step time: DMTG / (K x naive MTL)  (target <= 1.05 without shared blocks)", "",
                  f"Steps that learn S; the warm-up columns are the first {WARMUP_EPOCHS} epochs' steps (S fixed).", "",
                  "| setting | shared blocks | K | naive ms | DMTG ms | ratio | warm-up ms | warm-up ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['shared_blocks']} | {r['K']} | {r['naive_ms']:.2f} | {r['dmtg_ms']:.2f} | "
                  f"{r['ratio_vs_K_naive']:.2f} | {r.get('dmtg_warmup_ms', float('nan')):.2f} | "
                  f"{r.get('warmup_ratio_vs_K_naive', float('nan')):.2f} |" for r in result["step_ratio"]]
    if "n_ratio" in result:
        lines += ["", "## Step time N=40 / N=9 at K=5  (target <= 1.3)", "", "| setting | N=9 ms | N=40 ms | ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['n9_ms']:.2f} | {r['n40_ms']:.2f} | {r['ratio']:.2f} |" for r in result["n_ratio"]]
    if "live_heads" in result:
        lines += ["", "## Live heads at the end with head pruning (target <= 1.2 N, loss no worse)", "",
                  "| preset | seed | N | K | live heads | live/N | test loss (pruning) | test loss (no pruning) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['seed']} | {r['N']} | {r['K']} | {r['live_heads']} | {r['live_over_N']:.2f} | "
                  f"{r['test_loss_pruning']:.4f} | {r['test_loss_no_pruning']:.4f} |" for r in result["live_heads"]]
        for preset in dict.fromkeys(r["preset"] for r in result["live_heads"]):
            rs = [r for r in result["live_heads"] if r["preset"] == preset]
            lines.append(f"| {preset} | mean of {len(rs)} | | | {statistics.mean(r['live_heads'] for r in rs):.1f} | "
                         f"{statistics.mean(r['live_over_N'] for r in rs):.2f} | "
                         f"{statistics.mean(r['test_loss_pruning'] for r in rs):.4f} | "
                         f"{statistics.mean(r['test_loss_no_pruning'] for r in rs):.4f} |")
    if "planted" in result:
        p = result["planted"]
        lines += ["", "## Planted preset: total test loss, seeds 0-4 (DMTG issue checks)", "",
                  "| seed | naive MTL | single-task | oracle | DMTG | DMTG vs oracle |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['naive_mtl']:.4f} | {r['single_task']:.4f} | {r['oracle']:.4f} | {r['dmtg']:.4f} | "
                  f"{r['dmtg_vs_oracle']:+.2%} |" for r in p["runs"]]
        lines += ["", f"Initialisation luck: per data seed, the oracle and DMTG trained from {p['inits']} "
                  "initialisations (run seeds 1000 x seed + j, same data); mean (sd).", "",
                  "| seed | oracle mean (sd) | DMTG mean (sd) | DMTG vs oracle, means |", "|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['oracle_mean']:.4f} ({r['oracle_sd']:.4f}) | {r['dmtg_mean']:.4f} ({r['dmtg_sd']:.4f}) | "
                  f"{r['mean_dmtg_vs_oracle']:+.2%} |" for r in p["spread"]]
    if "configs" in result:
        lines += ["", "## Other configurations: total test loss (error), seeds 0-2", "",
                  "| configuration | seed | naive MTL | single-task | oracle | DMTG | DMTG vs oracle | DMTG found it |",
                  "|---|---|---|---|---|---|---|---|"]

        def cell(r: dict, m: str) -> str:
            return f"{r[m]:.4f}" + (f" ({r[m + '_error']:.4f})" if m + "_error" in r else "")
        lines += [f"| {r['config']} | {r['seed']} | {cell(r, 'naive_mtl')} | {cell(r, 'single_task')} | "
                  f"{cell(r, 'oracle')} | {cell(r, 'dmtg')} | {r['dmtg_vs_oracle']:+.2%} | "
                  f"{'yes' if r['dmtg_found_oracle'] else 'no'} |" for r in result["configs"]]
    if "multimnist_k" in result:
        rows = result["multimnist_k"]
        lines += ["", "## MultiMNIST: NormGain_E vs naive MTL, DMTG vs random grouping (target: DMTG >= random, "
                  "mean of seeds 0-2)", "", "| K | seed | DMTG | random | DMTG groups |", "|---|---|---|---|---|"]
        for K in dict.fromkeys(r["K"] for r in rows):
            rs = [r for r in rows if r["K"] == K]
            lines += [f"| {K} | {r['seed']} | {r['dmtg_normgain_e']:+.3f} | {r['random_normgain_e']:+.3f} | "
                      f"{' / '.join(','.join(g) for g in r['dmtg_groups'])} |" for r in rs]
            for label, sub in (("mean of seeds 0-2", rs[:3]), (f"mean of {len(rs)}", rs)):
                lines.append(f"| {K} | {label} | {statistics.mean(r['dmtg_normgain_e'] for r in sub):+.3f} | "
                             f"{statistics.mean(r['random_normgain_e'] for r in sub):+.3f} | |")
    atomic_write_text(OUT / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
