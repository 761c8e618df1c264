"""InterroGate's accuracy / compute trade-off over λ_s (Bejnordi et al., ICML 2024, Fig. 2) and its
sharing patterns (Fig. 3): ``taskgrouping interrogate-sweep`` trains naive MTL and STL once per seed,
then InterroGate for every λ_s, and writes the table and the plots.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence


from taskgrouping.figures import save_figure
from taskgrouping.io import atomic_write_json, atomic_write_text
from taskgrouping.methods.base import MethodContext
from taskgrouping.flops import count_parameters
from taskgrouping.methods.interrogate.method import interrogate, reference_flops
from taskgrouping.methods.interrogate.options import InterroGateOptions

__all__ = ["DEFAULT_LAMBDAS", "interrogate_sweep", "interrogate_sweep_cli", "summarise_sweep", "sweep_table",
           "plot_tradeoff", "plot_sharing"]

DEFAULT_LAMBDAS = (0.01, 0.03, 0.05, 0.07, 0.10)


def _check_sweep_args(lambdas: Sequence[float], seeds: Sequence[int]) -> tuple[list[float], list[int]]:
    lambdas = list(lambdas)
    seeds = list(seeds)
    if not lambdas:
        raise ValueError("interrogate sweep: give at least one lambda_s")
    for lam in lambdas:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"interrogate sweep: lambda_s values must be numbers >= 0, got {lam!r}")
    if len(set(lambdas)) != len(lambdas):
        raise ValueError(f"interrogate sweep: lambda_s values repeat: {lambdas}")
    if not seeds:
        raise ValueError("interrogate sweep: give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"interrogate sweep: seeds must be integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"interrogate sweep: seeds repeat: {seeds}")
    return [float(x) for x in lambdas], seeds


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def interrogate_sweep(config: Mapping[str, Any], lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                      seeds: Sequence[int] = (0,), out_dir: Path | str = "runs/interrogate-sweep",
                      echo=print) -> dict[str, Any]:
    """InterroGate's accuracy / FLOPs trade-off over λ_s (paper Fig. 2) on one config.

    Per seed: naive MTL and STL are trained once (and reused by every λ_s as InterroGate's
    initialisation and reference), then InterroGate is trained for each λ_s with the config's
    ``interrogate:`` options. Δ_MTL is against STL on every task's primary metric
    (:func:`taskgrouping.metrics.delta_mtl`, InterroGate Eq. 6); FLOPs are the compiled network's.

    Writes ``sweep.json``, ``sweep.md`` (the table), ``tradeoff.png`` (Δ_MTL vs FLOPs with STL
    and naive MTL) and ``sharing_lambda_<λ>.png`` (task-specific fraction per layer and task, and
    which task dominates the shared mix via β; first seed) under ``out_dir``. Returns the summary
    (the table text under ``"table"``).
    """
    from taskgrouping.config import DEFAULTS, merge, validate
    from taskgrouping.engine.driver import Driver, prepare_data
    from taskgrouping.methods.base import METHODS
    from taskgrouping.metrics import delta_mtl

    from taskgrouping.engine.distributed import env_world_size

    lambdas, seeds = _check_sweep_args(lambdas, seeds)
    if env_world_size() > 1:  # its drivers and figures assume one process; each network is small
        raise ValueError("interrogate-sweep runs in one process; run it without torchrun")
    cfg = merge(DEFAULTS, dict(config))
    cfg["methods"] = ["naive_mtl", "single_task", "interrogate"]
    validate(cfg)
    driver = Driver(cfg, out_dir)
    out = driver.out
    driver.check_out_dir()
    driver.open(write_config=False)
    base_options = dict(cfg.get("interrogate") or {})
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        data = prepare_data(dict(cfg, seed=seed))
        InterroGateOptions.from_section("interrogate", base_options).check_data(data)  # before any training
        primary = {t.name: [t.primary_metric] for t in data.tasks}
        cache: dict[str, Any] = {}
        seed_dir = out / f"seed_{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)

        def ctx(name: str, options: dict[str, Any]) -> MethodContext:
            return driver.context(data, name, seed=seed, options=options, workdir=seed_dir / "checkpoints" / name,
                                  log=driver.logger(seed_dir / "metrics.jsonl", method=name), cache=cache)

        echo(f"[seed {seed}] naive MTL and single-task baselines on {data.name}")
        mtl = METHODS["naive_mtl"](ctx("naive_mtl", {}))
        stl = METHODS["single_task"](ctx("single_task", {}))
        cache["single_task_model"] = stl.model
        ref = reference_flops(ctx("reference", {}))
        run: dict[str, Any] = {
            "seed": seed,
            "single_task": {"per_task": stl.per_task, "delta_mtl": 0.0, "flops": ref["single_task"],
                            "params": count_parameters(stl.model), "train_seconds": stl.train_seconds},
            "naive_mtl": {"per_task": mtl.per_task, "delta_mtl": delta_mtl(mtl.per_task, stl.per_task, primary),
                          "flops": ref["naive_mtl"], "params": count_parameters(mtl.model),
                          "train_seconds": mtl.train_seconds},
            "interrogate": {},
        }
        for lam in lambdas:
            echo(f"[seed {seed}] InterroGate lambda_s={lam:g}")
            res = interrogate(ctx(f"interrogate_lambda_{lam:g}", dict(base_options, lambda_s=lam)))
            run["interrogate"][f"{lam:g}"] = {
                "lambda_s": lam, "per_task": res.per_task, "delta_mtl": delta_mtl(res.per_task, stl.per_task, primary),
                "flops": res.extra["flops"]["compiled"], "flops_gated": res.extra["flops"]["gated"],
                "params": res.extra["params"]["compiled"], "task_specific_fraction": res.extra["task_specific_fraction"],
                "sharing_pattern": res.extra["sharing_pattern"], "train_seconds": res.train_seconds,
                "compile_max_abs_diff": res.extra["compile_max_abs_diff"]}
        runs.append(run)
        atomic_write_json(seed_dir / "run.json", run, strict=True)
    summary = summarise_sweep(runs, lambdas)
    summary.update(config=cfg, seeds=seeds, lambdas=lambdas, **driver.provenance())
    summary["table"] = sweep_table(summary)
    atomic_write_json(out / "sweep.json", summary, strict=True)
    atomic_write_text(out / "sweep.md", summary["table"] + "\n")
    plot_tradeoff(summary, out / "tradeoff.png")
    for lam in lambdas:
        plot_sharing(runs[0]["interrogate"][f"{lam:g}"]["sharing_pattern"], out / f"sharing_lambda_{lam:g}.png",
                     title=f"InterroGate sharing pattern, lambda_s={lam:g}, seed {runs[0]['seed']}")
    driver.close()
    return summary


def interrogate_sweep_cli(config: Mapping[str, Any], lambdas: Sequence[float], seeds: Sequence[int],
                          out_dir: Path | str) -> str:
    """What ``taskgrouping interrogate-sweep`` runs: :func:`interrogate_sweep`, returning the table."""
    return interrogate_sweep(config, lambdas, seeds, out_dir, echo=lambda s: None)["table"]


def summarise_sweep(runs: Sequence[Mapping[str, Any]], lambdas: Sequence[float]) -> dict[str, Any]:
    """Means and standard deviations over seeds, and the two questions the sweep answers."""
    def agg(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        d_mean, d_std = _mean_std([r["delta_mtl"] for r in records])
        f_mean, f_std = _mean_std([r["flops"] for r in records])
        p_mean, _ = _mean_std([r["params"] for r in records])
        return {"delta_mtl": d_mean, "delta_mtl_std": d_std, "flops": f_mean, "flops_std": f_std, "params": p_mean,
                "n_seeds": len(records)}

    stl = agg([r["single_task"] for r in runs])
    mtl = agg([r["naive_mtl"] for r in runs])
    points = []
    for lam in lambdas:
        recs = [r["interrogate"][f"{lam:g}"] for r in runs]
        p = agg(recs)
        fr = [statistics.fmean(r["task_specific_fraction"].values()) for r in recs]
        p.update(lambda_s=lam, task_specific_fraction=statistics.fmean(fr))
        points.append(p)
    flops = [p["flops"] for p in points]
    monotone = all(b <= a for a, b in zip(flops, flops[1:]))
    winners = [p["lambda_s"] for p in points if p["delta_mtl"] >= mtl["delta_mtl"] and p["flops"] <= stl["flops"]]
    return {"single_task": stl, "naive_mtl": mtl, "interrogate": points,
            "answers": {"point_beating_naive_mtl_within_stl_flops": winners,
                        "flops_monotone_nonincreasing_in_lambda": monotone,
                        "flops_strictly_decreasing_in_lambda": all(b < a for a, b in zip(flops, flops[1:]))},
            "conventions": {"delta_mtl": "mean over tasks of (-1)^l (M - M_STL)/M_STL on each task's primary metric, "
                                         "test split, vs the same seed's STL (InterroGate Eq. 6); positive is better",
                            "flops": "torch.utils.flop_counter on one input, eval mode: InterroGate = compiled "
                                     "network incl. heads; STL = N single-task networks; naive MTL = one network"}}


def sweep_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of the sweep (mean ± std over seeds)."""
    stl_flops = summary["single_task"]["flops"]

    def row(name: str, p: Mapping[str, Any], frac: str) -> str:
        return (f"| {name} | {100 * p['delta_mtl']:+.2f} ± {100 * p['delta_mtl_std']:.2f} | "
                f"{p['flops'] / 1e6:.3f} | {p['flops'] / stl_flops:.3f} | {int(p['params']):,} | {frac} |")

    lines = ["| method | Δ_MTL vs STL (%) | MFLOPs | FLOPs / STL | params | task-specific fraction |",
             "|---|---|---|---|---|---|",
             row("single-task (STL)", summary["single_task"], "1"),
             row("naive MTL", summary["naive_mtl"], "0")]
    for p in summary["interrogate"]:
        lines.append(row(f"InterroGate λ_s={p['lambda_s']:g}", p, f"{p['task_specific_fraction']:.3f}"))
    a = summary["answers"]
    n = summary["single_task"]["n_seeds"]
    lines += ["", f"{n} seed(s); Δ_MTL on the test split against the same seed's STL, each task's primary metric.",
              f"- InterroGate points with Δ_MTL ≥ naive MTL's at ≤ STL FLOPs: "
              f"{', '.join(f'λ_s={x:g}' for x in a['point_beating_naive_mtl_within_stl_flops']) or 'none'}",
              f"- FLOPs non-increasing as λ_s grows: {'yes' if a['flops_monotone_nonincreasing_in_lambda'] else 'no'}"]
    return "\n".join(lines)


def plot_tradeoff(summary: Mapping[str, Any], path: Path) -> None:
    """Δ_MTL vs FLOPs for every λ_s, with STL and naive MTL (InterroGate Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = summary["interrogate"]
    ax.errorbar([p["flops"] / 1e6 for p in pts], [100 * p["delta_mtl"] for p in pts],
                xerr=[p["flops_std"] / 1e6 for p in pts], yerr=[100 * p["delta_mtl_std"] for p in pts],
                fmt="o-", color="tab:blue", capsize=3, label="InterroGate")
    for p in pts:
        ax.annotate(f"λ={p['lambda_s']:g}", (p["flops"] / 1e6, 100 * p["delta_mtl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for key, label, marker, color in (("single_task", "STL", "s", "black"), ("naive_mtl", "naive MTL", "^", "tab:red")):
        p = summary[key]
        ax.errorbar([p["flops"] / 1e6], [100 * p["delta_mtl"]], yerr=[100 * p["delta_mtl_std"]], fmt=marker,
                    color=color, capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("MFLOPs per input (compiled network)")
    ax.set_ylabel("Δ_MTL vs STL (%)")
    ax.set_title("Accuracy / compute trade-off")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_sharing(pattern: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Per layer and task: fraction of task-specific channels (left) and each task's mean weight
    softmax(β) in the shared mix, i.e. how much it contributes to the shared bank (right) - Fig. 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [r["layer"] for r in pattern]
    tasks = list(pattern[0]["task_specific_fraction"])
    spec = np.array([[r["task_specific_fraction"][t] for t in tasks] for r in pattern])
    share = np.array([[r["beta_mean"][t] for t in tasks] for r in pattern])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 0.9 * len(tasks), 1.5 + 0.35 * len(layers)),
                                 gridspec_kw={"width_ratios": [1.2, 1]})
    im = a1.imshow(spec, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    a1.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
    a1.set_yticks(range(len(layers)), layers, fontsize=7)
    a1.set_title("task-specific channel fraction", fontsize=9)
    fig.colorbar(im, ax=a1, fraction=0.046)
    left = np.zeros(len(layers))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(tasks), 2)))
    for i, t in enumerate(tasks):
        a2.barh(range(len(layers)), share[:, i], left=left, color=colors[i], label=t)
        left += share[:, i]
    a2.set_yticks(range(len(layers)), layers, fontsize=7)
    a2.invert_yaxis()
    a2.set_xlim(0, 1)
    a2.set_title("mean softmax(β): contribution to the shared mix", fontsize=9)
    a2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
