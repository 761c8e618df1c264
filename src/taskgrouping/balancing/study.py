"""The balancer study of Mao et al. (2024), "Robust Analysis of Multi-Task Learning Efficiency".

:func:`run_benchmark` trains naive MTL (one shared network, one head per task; or any network
``model_fn`` builds) with every requested balancer at every requested gradient level, logs the
GDS / GMS / FD diagnostics during training (:class:`~taskgrouping.diagnostics.DiagnosticsCallback`,
every ``diagnostics_every`` steps), and writes under ``out_dir``:

* ``benchmark.json``: the config, every run's test / validation metrics per seed, Δ_MTL, mean
  rank, diagnostics history and last-epoch means, and the summaries below;
* ``table.md`` (also returned and printed): the paper-style table - per-task primary metric
  (mean over seeds) with ↑ / ↓ when better / worse than the EW baseline (EW at parameter level),
  Δ_MTL vs single-task learning, mean rank across tasks, last-epoch GDS / GMS / FD - and the
  ranking-similarity table;
* ``trajectories.png``: GDS / GMS / FD against the training step for every run (first seed);
* ``metrics.jsonl``: one record per run, seed and epoch (the trainer's log, diagnostics included).

Levels. ``param``: the balancer takes per-task gradients w.r.t. the shared parameters. ``feature``:
the fast gradient surrogate (``feature_level=True``), per-task gradients w.r.t. the shared
features. A balancer runs at every requested level it has: loss-weighting methods (UW, DWA, RLW,
FAMO) have no feature-level variant and run at parameter level only; MGDA-UB and Aligned-MTL-UB
are feature-level by definition and run at feature level only. The table says which.

Reference runs, per seed: single-task learning (one network per task, EW) for Δ_MTL
(:func:`taskgrouping.metrics.delta_mtl` on each task's primary metric, InterroGate Eq. 6), and EW at
parameter level for the arrows (added to the runs when not requested). Mean rank
(:func:`taskgrouping.metrics.mean_rank`) ranks the benchmark runs (not STL) per seed and is
averaged over seeds. Test metrics are those of the epoch the trainer selects (``train.select``).

Diagnostics. All runs are measured alike (``diagnostics_level``, ``param`` by default: gradients
w.r.t. the shared parameters; FD always on the shared features), so their values can be ranked
against each other. A run's value is the mean over the entries logged in its last epoch (the last
epoch that has entries, when an epoch is shorter than ``diagnostics_every`` steps), averaged over
seeds. Ranking similarity (Mao et al.): S = the fraction of ordered run pairs that the diagnostic
and Δ_MTL order alike (:func:`taskgrouping.diagnostics.ranking_similarity`); the table reports S
and |S − 0.5| (how faithful the diagnostic is, whichever direction). Expected directions
(hypotheses the table lets one check): GDS positive (conflicting gradient directions hurt, Yu et
al. 2020), GMS positive (unequal gradient magnitudes let some tasks dominate), FD negative (high
task entropy per feature means tasks compete for the same shared features; Mao et al.).

The config's ``balancer:`` section is ignored (the benchmark sets the balancer of every run); per
balancer options go in ``balancer_options``. Nothing is checkpointed.
"""

from __future__ import annotations

import inspect
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from taskgrouping.balancing.base import BALANCERS, get_balancer
from taskgrouping.diagnostics import MEASURES, DiagnosticsCallback, plot_trajectories, ranking_similarity
from taskgrouping.engine.driver import Driver, prepare_data
from taskgrouping.engine.distributed import env_world_size
from taskgrouping.engine.hooks import TaskLossObjective
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.io import atomic_write_json, atomic_write_text
from taskgrouping.methods.base import MethodContext
from taskgrouping.metrics import delta_mtl, mean_rank
from taskgrouping.tasks import HIGHER_IS_BETTER

LEVELS = ("param", "feature")
BASELINE = "ew@param"
#: diagnostic -> (expected sign of its correlation with Δ_MTL, why)
EXPECTED_DIRECTION: dict[str, tuple[str, str]] = {
    "gds": ("positive", "aligned task gradients = fewer conflicts (Yu et al. 2020)"),
    "gms": ("positive", "similar gradient magnitudes = no task dominates the update"),
    "fd": ("negative", "high task entropy per feature = tasks compete for the same shared features (Mao et al.)"),
}

ModelFn = Callable[[MethodContext], nn.Module]


# -- what runs ------------------------------------------------------------------------------------

def balancer_levels(name: str, tasks: Sequence[str] | None = None, options: Mapping[str, Any] | None = None,
                    ) -> tuple[str, ...]:
    """The gradient levels a registered balancer has: ``("param", "feature")``, ``("param",)`` (no
    feature-level variant) or ``("feature",)`` (feature-level by definition, e.g. MGDA-UB).

    Raises ``ValueError`` for an unknown name or option (from :func:`get_balancer`).
    """
    default = get_balancer(name, tasks=tasks, **dict(options or {}))
    if getattr(default, "uses_features", False):
        return ("feature",)
    factory = BALANCERS[name.lower()]
    params = inspect.signature(factory).parameters
    accepts = "feature_level" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return ("param", "feature") if accepts else ("param",)


def plan_runs(balancers: Sequence[str], levels: Sequence[str], tasks: Sequence[str],
              balancer_options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict]:
    """The runs ``[{"id", "balancer", "level", "options"}]`` (EW at parameter level first) and, per
    balancer, the levels it was run at when that differs from the requested ones."""
    options = {k.lower(): dict(v) for k, v in (balancer_options or {}).items()}
    for name, opts in options.items():
        if "feature_level" in opts:
            raise ValueError(f"balancer_options[{name!r}] sets feature_level; the benchmark sets it per run "
                             "from levels (param / feature)")
    unknown = sorted(set(options) - {b.lower() for b in balancers} - {"ew"})
    if unknown:
        raise ValueError(f"balancer_options names balancers that are not benchmarked: {unknown}; "
                         f"benchmarked: {sorted({b.lower() for b in balancers})}")
    names = ["ew"] + [b.lower() for b in balancers if b.lower() != "ew"]
    runs: list[dict[str, Any]] = []
    restricted: dict[str, list[str]] = {}
    for name in names:
        has = balancer_levels(name, tasks, options.get(name))
        wanted = list(levels) if name in [b.lower() for b in balancers] else ["param"]
        if name == "ew" and "param" not in wanted:
            wanted = ["param"] + wanted
        chosen = [lv for lv in LEVELS if lv in wanted and lv in has] or [has[0]]
        if set(chosen) != set(wanted) and name in [b.lower() for b in balancers]:
            restricted[name] = list(has)
        for lv in chosen:
            opts = dict(options.get(name, {}))
            if lv == "feature" and "feature" in has and len(has) == 2:
                opts["feature_level"] = True
            runs.append({"id": f"{name}@{lv}", "balancer": name, "level": lv, "options": opts})
    return runs, restricted


def naive_mtl_network(ctx: MethodContext) -> nn.Module:
    """The default network: naive MTL (one branch, all heads), as method ``naive_mtl`` builds it."""
    return ctx.build_model(Grouping.partition([ctx.data.task_names]))


def check_model_fits(model: nn.Module, ctx: MethodContext, runs: Sequence[dict[str, Any]],
                     diagnostics: DiagnosticsCallback) -> None:
    """Raise a ``ValueError`` naming the balancer (or the diagnostics) when ``model`` cannot give
    what it needs: shared parameters for parameter-level per-task gradients, shared features
    (one forward pass on a training batch) for feature-level ones."""
    shared = list(model.shared_parameters()) if hasattr(model, "shared_parameters") else []
    x, targets = next(iter(ctx.loaders()[0]))
    with torch.no_grad():
        out = TaskLossObjective(ctx.data.tasks)(model, x, targets)
    has_features = bool(out.features)
    kind = type(model).__name__
    for run in runs:
        bal = get_balancer(run["balancer"], tasks=ctx.data.task_names, **run["options"])
        if getattr(bal, "uses_features", False) and not has_features:
            raise ValueError(f"balancer {run['balancer']!r} at level {run['level']!r} needs per-task gradients w.r.t. "
                             f"the shared features, but {kind} gives none (it needs forward_heads(x) returning "
                             "(predictions, {branch: features})); use level 'param' or another model")
        if getattr(bal, "needs_grads", False) and not getattr(bal, "uses_features", False) and not shared:
            has = "an empty shared_parameters()" if hasattr(model, "shared_parameters") else "no shared_parameters()"
            raise ValueError(f"balancer {run['balancer']!r} at level {run['level']!r} needs per-task gradients w.r.t. "
                             f"the shared parameters, but {kind} has {has}; use level 'feature' or another model")
    if diagnostics.needs_shared_parameters and not shared:
        raise ValueError(f"diagnostics at level 'param' need the shared parameters, but {kind} has none "
                         "(shared_parameters()); pass diagnostics_level='feature'")
    if diagnostics.needs_features and not has_features:
        raise ValueError(f"diagnostics (FD, or level 'feature') need the shared features, but {kind} gives none "
                         "(forward_heads)")


def _check_args(balancers: Sequence[str], levels: Sequence[str], seeds: Sequence[int], every: int,
                diagnostics_level: str) -> tuple[list[str], list[str], list[int]]:
    if isinstance(balancers, str) or not balancers:
        raise ValueError(f"balancers must be a non-empty list of balancer names, got {balancers!r}")
    names = [str(b) for b in balancers]
    if len({b.lower() for b in names}) != len(names):
        raise ValueError(f"balancers lists a balancer twice: {names}")
    for b in names:
        get_balancer(b)  # unknown names: ValueError listing the registered ones
    if isinstance(levels, str) or not levels:
        raise ValueError(f"levels must be a non-empty list of {LEVELS}, got {levels!r}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown level(s) {bad}; expected some of {list(LEVELS)}")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"diagnostics_every must be a positive integer (steps), got {every!r}")
    if diagnostics_level not in LEVELS:
        raise ValueError(f"diagnostics_level must be one of {list(LEVELS)}, got {diagnostics_level!r}")
    return names, list(dict.fromkeys(levels)), seeds


# -- the benchmark ----------------------------------------------------------------------------------

def run_benchmark(config: Mapping[str, Any], balancers: Sequence[str], levels: Sequence[str] = LEVELS,
                  seeds: Sequence[int] = (0,), out_dir: Path | str = "runs/balance-bench",
                  diagnostics_every: int = 10, *, diagnostics_level: str = "param",
                  balancer_options: Mapping[str, Mapping[str, Any]] | None = None,
                  model_fn: ModelFn | None = None, echo: Callable[[str], None] = print) -> str:
    """Benchmark ``balancers`` × ``levels`` on naive MTL over ``seeds``; return (and print) the tables.

    Args:
        config: a run config (``build_config`` output, or a partial dict merged over the defaults):
            its ``data``, ``model``, ``train``, ``K`` and ``threads`` are used.
        balancers: registered balancer names (EW at parameter level is always run as the baseline).
        levels: ``"param"`` and/or ``"feature"`` (see the module docstring for balancers that have
            only one).
        seeds: one full benchmark (data, initialisation, STL reference) per seed.
        out_dir: results directory; must be empty or absent.
        diagnostics_every: steps between GDS / GMS / FD measurements.
        diagnostics_level: gradients of GDS / GMS w.r.t. the shared ``"param"``-eters or ``"feature"``-s.
        balancer_options: balancer name -> options (``feature_level`` is set by the benchmark).
        model_fn: builds the network every run trains (default :func:`naive_mtl_network`); it is
            called with torch seeded by the run's seed, so every run starts from the same weights.

    Raises ``ValueError`` (before anything is trained or written) for an unknown balancer, level or
    option, and for a balancer or diagnostic that needs per-task gradients the model cannot give.
    """
    from taskgrouping.config import DEFAULTS, merge, validate
    from taskgrouping.methods.baselines import single_task

    names, levels, seeds = _check_args(balancers, levels, seeds, diagnostics_every, diagnostics_level)
    if env_world_size() > 1:  # it measures per-step diagnostics, which each rank would take on its slice only
        raise ValueError("balance-bench runs in one process; run it without torchrun")
    cfg = merge(DEFAULTS, dict(config))
    validate(cfg)
    driver = Driver(cfg, out_dir)
    driver.check_out_dir()
    out = driver.out
    build = model_fn or naive_mtl_network
    metrics_file = out / "metrics.jsonl"
    per_seed: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    restricted: dict[str, list[str]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for i, seed in enumerate(seeds):
        data = prepare_data(dict(cfg, seed=seed))
        primary = {t.name: [t.primary_metric] for t in data.tasks}

        def context(tag: str, balancer: dict[str, Any]) -> MethodContext:
            return driver.context(data, f"balance-bench:{tag}", seed=seed, options={}, balancer=balancer,
                                  log=driver.logger(metrics_file, run=tag, seed=seed))

        if i == 0:  # every error before anything is trained or written
            runs, restricted = plan_runs(names, levels, data.task_names, balancer_options)
            probe = context("probe", {"name": "ew"})
            torch.manual_seed(seed)
            check_model_fits(build(probe), probe, runs, DiagnosticsCallback(diagnostics_every, diagnostics_level))
            driver.open(write_config=False)  # the directory and its lock, once every check passed
        echo(f"[seed {seed}] single-task reference on {data.name} ({len(data.tasks)} tasks)")
        stl = single_task(context("stl", {"name": "ew", "options": {}}))
        seed_rec: dict[str, Any] = {"seed": seed, "stl": {"per_task": stl.per_task, "train_seconds": stl.train_seconds},
                                    "runs": {}}
        for run in runs:
            echo(f"[seed {seed}] {run['id']}")
            ctx = context(run["id"], {"name": run["balancer"], "options": run["options"]})
            cb = DiagnosticsCallback(diagnostics_every, diagnostics_level)
            torch.manual_seed(seed)
            model = build(ctx)
            result, val, test = ctx.fit(model, run["id"], callbacks=[cb])
            losses = [v for h in result.history for v in h["train_loss"].values()]
            seed_rec["runs"][run["id"]] = {
                "per_task": test, "val_per_task": val, "delta_mtl": delta_mtl(test, stl.per_task, primary),
                "train_seconds": result.train_seconds, "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run, "finite_train_losses": all(math.isfinite(v) for v in losses),
                "diagnostics": cb.epoch_means(), "diagnostics_history": cb.history,
            }
            if i == 0:
                histories[run["id"]] = cb.history
        ranks = mean_rank({rid: r["per_task"] for rid, r in seed_rec["runs"].items()},
                          {t.name: t.primary_metric for t in data.tasks})
        for rid, r in ranks.items():
            seed_rec["runs"][rid]["mean_rank"] = r
        per_seed.append(seed_rec)
    summary = summarise(per_seed, runs, {t.name: t.primary_metric for t in data.tasks})
    summary.update(config=cfg, balancers=names, levels=levels, seeds=seeds, diagnostics_every=diagnostics_every,
                   diagnostics_level=diagnostics_level, restricted_levels=restricted, per_seed=per_seed,
                   dataset={"name": data.name, "tasks": data.task_names}, conventions=conventions(diagnostics_level))
    table = benchmark_table(summary)
    summary["table"] = table
    atomic_write_json(out / "benchmark.json", summary, strict=True)
    atomic_write_text(out / "table.md", table + "\n")
    plot_trajectories(histories, out / "trajectories.png",
                      title=f"{data.name}: diagnostics during training (seed {seeds[0]}, level {diagnostics_level})")
    driver.close()
    echo(table)
    return table


# -- summaries and tables ---------------------------------------------------------------------------

def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(per_seed: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
              primary: Mapping[str, str]) -> dict[str, Any]:
    """Seed means (and standard deviations) per run, and the ranking similarity of each diagnostic."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        rid = run["id"]
        recs = [s["runs"][rid] for s in per_seed]
        d_mean, d_std = _mean_std([r["delta_mtl"] for r in recs])
        rows[rid] = {
            "balancer": run["balancer"], "level": run["level"], "options": run["options"],
            "primary": {t: _mean_std([r["per_task"][t][m] for r in recs])[0] for t, m in primary.items()},
            "delta_mtl": d_mean, "delta_mtl_std": d_std,
            "mean_rank": _mean_std([r["mean_rank"] for r in recs])[0],
            "diagnostics": {m: _mean_std([r["diagnostics"].get(m, math.nan) for r in recs])[0] for m in MEASURES},
            "train_seconds": _mean_std([r["train_seconds"] for r in recs])[0],
            "all_finite": all(r["finite_train_losses"] for r in recs),
        }
    stl = {t: _mean_std([s["stl"]["per_task"][t][m] for s in per_seed])[0] for t, m in primary.items()}
    similarity = {}
    for m in MEASURES:
        ids = [rid for rid, r in rows.items() if math.isfinite(r["diagnostics"][m]) and math.isfinite(r["delta_mtl"])]
        entry: dict[str, Any] = {"expected": EXPECTED_DIRECTION[m][0], "why": EXPECTED_DIRECTION[m][1],
                                 "n_runs": len(ids), "S": None, "gap": None, "per_seed_S": []}
        if len(ids) >= 2:
            s = ranking_similarity([rows[r]["diagnostics"][m] for r in ids], [rows[r]["delta_mtl"] for r in ids])
            entry.update(S=s, gap=abs(s - 0.5))
            for seed_rec in per_seed:
                vals = [(seed_rec["runs"][r]["diagnostics"].get(m, math.nan), seed_rec["runs"][r]["delta_mtl"])
                        for r in ids]
                vals = [v for v in vals if math.isfinite(v[0]) and math.isfinite(v[1])]
                entry["per_seed_S"].append(ranking_similarity(*zip(*vals)) if len(vals) >= 2 else None)
        similarity[m] = entry
    return {"primary_metrics": dict(primary), "rows": rows, "stl_primary": stl, "ranking_similarity": similarity}


def conventions(diagnostics_level: str) -> dict[str, str]:
    """What the numbers of the summary mean (written with them into benchmark.json)."""
    wrt = "parameters" if diagnostics_level == "param" else "features"
    return {
        "delta_mtl": "mean over tasks of (-1)^l (M - M_STL)/M_STL on each task's primary metric, STL = single-task "
                     "networks trained with the same settings (InterroGate Eq. 6); positive is better; mean over seeds",
        "arrows": f"↑ / ↓: the seed-mean primary metric is better / worse than {BASELINE}'s",
        "mean_rank": "rank of the run among the benchmark runs (STL excluded) per task on the primary metric, "
                     "averaged over tasks, then over seeds; 1 is best",
        "diagnostics": f"GDS/GMS from per-task gradients w.r.t. the shared {wrt}, "
                       "FD on the shared features (Mao et al. 2024); mean over the last logged epoch, then over seeds",
        "ranking_similarity": "S = fraction of ordered run pairs ordered alike by the diagnostic and by Delta_MTL "
                              "(1: same order, 0: reversed, 0.5: unrelated); reported with |S - 0.5|",
        "epoch_selection": "test metrics of the epoch selected by train.select (default: lowest validation loss)",
    }


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _arrow(value: float, base: float, metric: str) -> str:
    if not (math.isfinite(value) and math.isfinite(base)) or value == base:
        return "="
    better = value > base if HIGHER_IS_BETTER[metric] else value < base
    return "↑" if better else "↓"


def benchmark_table(summary: Mapping[str, Any]) -> str:
    """The markdown tables of a :func:`run_benchmark` summary (can be rebuilt from benchmark.json)."""
    primary: dict[str, str] = summary["primary_metrics"]
    rows: dict[str, dict[str, Any]] = summary["rows"]
    tasks = list(primary)
    base = rows[BASELINE]
    direction = {t: "↑ better" if HIGHER_IS_BETTER[m] else "↓ better" for t, m in primary.items()}
    head = (["balancer", "level"] + [f"{t} {primary[t]} ({direction[t]})" for t in tasks]
            + ["Δ_MTL vs STL (%)", "mean rank", "GDS", "GMS", "FD", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    stl = summary["stl_primary"]
    lines.append("| " + " | ".join(["STL (reference)", "–"] + [_fmt(stl[t]) for t in tasks]
                                   + ["0.00", "–", "–", "–", "–", "–"]) + " |")
    for rid, r in rows.items():
        cells = []
        for t in tasks:
            v = r["primary"][t]
            cells.append(_fmt(v) + ("" if rid == BASELINE else " " + _arrow(v, base["primary"][t], primary[t])))
        dm = _fmt(100 * r["delta_mtl"], "+.2f") if math.isfinite(r["delta_mtl"]) else "–"
        if len(summary.get("seeds", [])) > 1 and math.isfinite(r["delta_mtl_std"]):
            dm += f" ± {100 * r['delta_mtl_std']:.2f}"
        name = r["balancer"] + (" (baseline)" if rid == BASELINE else "") + ("" if r["all_finite"] else " (NaN!)")
        lines.append("| " + " | ".join([name, r["level"]] + cells + [
            dm, _fmt(r["mean_rank"], ".2f"), _fmt(r["diagnostics"]["gds"], ".3f"), _fmt(r["diagnostics"]["gms"], ".3f"),
            _fmt(r["diagnostics"]["fd"], ".3f"), _fmt(r["train_seconds"], ".1f")]) + " |")
    ds = summary.get("dataset", {})
    lines += ["", f"dataset {ds.get('name', '?')} ({len(tasks)} tasks), seeds {summary.get('seeds')}; "
              f"arrows vs {BASELINE}; diagnostics every {summary.get('diagnostics_every')} steps at level "
              f"{summary.get('diagnostics_level')!r}, mean of the last logged epoch."]
    restricted = summary.get("restricted_levels") or {}
    param_only = sorted(b for b, lv in restricted.items() if list(lv) == ["param"])
    feature_only = sorted(b for b, lv in restricted.items() if list(lv) == ["feature"])
    if param_only:
        lines.append(f"Parameter level only (no feature-level variant): {', '.join(param_only)}.")
    if feature_only:
        lines.append(f"Feature level only (feature-level by definition): {', '.join(feature_only)}.")
    lines += ["", "Ranking similarity of each diagnostic's ordering of the runs with their Δ_MTL ordering "
              "(Mao et al. 2024):", "",
              "| diagnostic | expected correlation with Δ_MTL | S | \\|S − 0.5\\| | runs | S per seed |",
              "|---|---|---|---|---|---|"]
    for m, e in summary["ranking_similarity"].items():
        per_seed = ", ".join(_fmt(s, ".3f") for s in e["per_seed_S"]) or "–"
        lines.append(f"| {m.upper()} | {e['expected']} ({e['why']}) | {_fmt(e['S'], '.3f')} | {_fmt(e['gap'], '.3f')} "
                     f"| {e['n_runs']} | {per_seed} |")
    lines.append("")
    lines.append("S > 0.5: higher diagnostic goes with higher Δ_MTL; S < 0.5: with lower Δ_MTL.")
    return "\n".join(lines)


__all__ = ["run_benchmark", "balancer_levels", "plan_runs", "check_model_fits", "naive_mtl_network", "summarise",
           "benchmark_table", "EXPECTED_DIRECTION", "LEVELS"]
