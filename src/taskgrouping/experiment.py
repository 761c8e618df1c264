"""Config -> run -> results directory.

``DIR/config.yaml`` (the resolved config), ``DIR/metrics.jsonl`` (one record per network and epoch),
``DIR/results.json`` and ``DIR/table.md`` (written atomically at the end, never partially),
``DIR/checkpoints/<method>/<network>/`` (resumable), ``DIR/partial/<method>.json`` (finished
methods, so a resumed run skips them), ``DIR/models/<method>.safetensors`` (final weights),
``DIR/data_fingerprint.json`` (what ``--resume`` checks the data against) and ``DIR/.lock`` (held
while a command works in the directory). Every JSON file is strict JSON (NaN / inf as ``null``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file

from taskgrouping.config import ConfigError
from taskgrouping.data.base import TaskData
from taskgrouping.engine.checkpoint import CheckpointError
from taskgrouping.engine.driver import Driver, discard_on_error, prepare_data
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.io import atomic_write_json, atomic_write_text, save_state_dict
from taskgrouping.methods.base import MethodContext, MethodResult, available_methods, method_options
from taskgrouping.metrics import (PER_TASK_PRIMARY, delta_mtl, mean_rank, norm_gain, summary_convention,
                                  tasks_with_metric, total)
from taskgrouping.report import console_table, groups_inline, results_table


def run_experiment(config: dict[str, Any], out_dir: Path | str, resume: bool = False,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``config`` on the same data and write the results directory.

    Raises ``ConfigError`` / ``ValueError`` / ``FileNotFoundError`` before anything is written when
    the config, the data or the output directory is wrong (``--resume`` on another config or other
    data, a directory another run holds); a failure before any training leaves nothing behind.
    """
    with discard_on_error(out_dir), Driver(config, out_dir, resume) as driver:
        return _run(driver, config, resume, echo)


def _run(driver: Driver, config: dict[str, Any], resume: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    out = driver.out
    driver.check_out_dir(can_resume=True)  # first: a directory another run holds is refused at once
    data = prepare_data(config)
    methods = available_methods()
    for name in config["methods"]:  # options that cannot work on this data, before anything is written
        try:
            method_options(name, config.get(name)).check_data(data)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    driver.open()
    (out / "partial").mkdir(exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    cache: dict[str, Any] = {}
    results: dict[str, MethodResult | dict[str, Any]] = {}
    for name in config["methods"]:
        partial = out / "partial" / f"{name}.json"
        log = driver.logger(metrics_file, resume=resume, method=name)
        ctx = driver.context(data, name, workdir=out / "checkpoints" / name, log=log, cache=cache,
                             figures_dir=out / "figures", diagnostics=True)
        if resume and partial.is_file():
            results[name] = _read_partial(partial)
            echo(f"[{name}] already finished; loaded {partial}")
            if name == "naive_mtl":
                _restore_naive(ctx, out, results[name])
            continue
        echo(f"[{name}] training on {data.name} ({len(data.tasks)} tasks, K={config['K']}, seed={config['seed']})")
        t0 = time.perf_counter()
        res = methods[name](ctx)
        variants = res.extra.pop("variants", {})
        record = method_record(res, data)
        record["wall_seconds"] = time.perf_counter() - t0
        record["variants"] = {f"{name}/{v}": method_record(r, data) for v, r in variants.items()}
        if res.model is not None:
            save_state_dict(out / "models" / f"{name}.safetensors", res.model.state_dict())
        atomic_write_json(partial, record, strict=True)
        results[name] = record
        echo(f"[{name}] total test loss {record['total_test_loss']:.4f}; groups "
             f"{groups_inline(record['grouping'], len(data.tasks))}")
        if res.extra.get("warning"):
            echo(f"[{name}] warning: {res.extra['warning']}")
    for name in list(results):  # variants (e.g. DMTG's grouping retrained) become rows of their own
        results.update(results[name].pop("variants", {}) or {})
    summary = summarise(config, data, results)
    summary.update(driver.provenance())
    summary["figures"] = write_figures(summary, out / "figures", echo)
    table = results_table(summary)
    atomic_write_json(out / "results.json", summary, strict=True)
    atomic_write_text(out / "table.md", table + "\n")
    echo(console_table(summary, where=f"{out / 'table.md'} and {out / 'results.json'}"))
    return summary


def write_figures(summary: dict[str, Any], folder: Path, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Draw ``folder/comparison.png`` (each method's NormGain against its training time,
    :func:`~taskgrouping.figures.comparison_figure`) and return the run's figures by name (DMTG's
    assignment heatmaps included); without a reference run there is no NormGain and no comparison."""
    from taskgrouping.figures import comparison_figure, normgain_key

    figures = {f"{name}_assignment": rec["assignment_figure"] for name, rec in summary["methods"].items()
               if rec.get("assignment_figure")}
    if normgain_key(summary["methods"]) is None:
        echo(f"no comparison figure: the reference method {summary['config'].get('reference')!r} was not run")
        return figures
    figures["comparison"] = str(comparison_figure(summary, folder / "comparison.png"))
    return figures


def _read_partial(path: Path) -> dict[str, Any]:
    """A finished method's record; a damaged file is reported, naming it."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); expected the record of a finished method: "
                              "delete it to train that method again") from None
    if not isinstance(record, dict) or "per_task" not in record:
        raise CheckpointError(f"{str(path)!r} is not a method record (no 'per_task'); delete it to train that "
                              "method again")
    for key in ("per_task", "val_per_task"):  # metrics written as null (NaN is not JSON) are NaN again
        for metrics in (record.get(key) or {}).values():
            if isinstance(metrics, dict):
                metrics.update({m: math.nan for m, v in metrics.items() if v is None})
    return record


def _restore_naive(ctx: MethodContext, out: Path, record: dict[str, Any]) -> None:
    """Put the finished naive-MTL model back in the cache so warm starts after a resume reuse it."""
    weights = out / "models" / "naive_mtl.safetensors"
    if weights.is_file():
        model = ctx.build_model(Grouping.from_json({"groups": record["grouping"], "serves": record["serves"]}))
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as exc:  # truncated, corrupted or another model's weights: never used silently
            raise CheckpointError(f"{str(weights)!r} is unreadable or does not fit the naive_mtl model "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())}); expected the weights "
                                  "this run saved: delete it and partial/naive_mtl.json to train naive_mtl again"
                                  ) from None
        ctx.cache["naive_mtl_model"] = model


def method_record(res: MethodResult, data: TaskData) -> dict[str, Any]:
    """The JSON fields every method reports."""
    classification = [t.name for t in data.tasks if t.kind in ("binary", "multiclass")]
    rec = {
        "per_task": res.per_task,
        "val_per_task": res.val_per_task,
        "total_test_loss": total(res.per_task, "loss"),
        "total_test_error": total({t: res.per_task[t] for t in classification}, "error") if classification else None,
        "grouping": res.grouping.as_lists(),
        "serves": res.grouping.serves,
        "train_seconds": res.train_seconds,
        "n_networks": res.n_networks,
    }
    rec.update(ranking_means(res.per_task, data))
    rec.update(res.extra)
    return rec


def ranking_means(per_task: dict[str, dict[str, Any]], data: TaskData) -> dict[str, float | None]:
    """``mean_auroc`` and ``mean_average_precision`` over the binary tasks whose value is defined
    (a split with one class has none); ``None`` when there is no binary task or no defined value."""
    binary = [t.name for t in data.tasks if t.kind == "binary"]
    out: dict[str, float | None] = {}
    for metric in ("auroc", "average_precision"):
        vals = [v for v in ((per_task.get(n) or {}).get(metric) for n in binary)
                if isinstance(v, (int, float)) and not math.isnan(v)]
        out[f"mean_{metric}"] = sum(vals) / len(vals) if vals else None
    return out


def summarise(config: dict[str, Any], data: TaskData, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add NormGain_L / NormGain_E (and NormGain_M on ``primary_metric``; vs the reference), Delta_MTL
    (vs single_task) and mean rank (on ``primary_metric``, or each task's own metric) to every method."""
    ref_name = config.get("reference", "naive_mtl")
    ref = results.get(ref_name)
    stl = results.get("single_task")
    classification = [t.name for t in data.tasks if t.kind in ("binary", "multiclass")]
    primary = {t.name: [t.primary_metric] for t in data.tasks}
    metric = config.get("primary_metric") or PER_TASK_PRIMARY
    ranked = ({t.name: t.primary_metric for t in data.tasks} if metric == PER_TASK_PRIMARY
              else dict.fromkeys(tasks_with_metric(data.tasks, metric), metric))
    for rec in results.values():
        pt = rec["per_task"]
        rec["norm_gain_l"] = norm_gain(pt, ref["per_task"], "loss") if ref else None
        rec["norm_gain_e"] = (norm_gain(pt, ref["per_task"], "error", classification)
                              if ref and classification else None)
        rec["norm_gain_m"] = (norm_gain(pt, ref["per_task"], metric, list(ranked))
                              if ref and metric != PER_TASK_PRIMARY else None)
        rec["delta_mtl"] = delta_mtl(pt, stl["per_task"], primary) if stl else None
        rec.update(ranking_means(pt, data))  # also for records a resumed run read from partial/
    ranks = mean_rank({m: r["per_task"] for m, r in results.items()}, ranked)
    for m, r in ranks.items():
        results[m]["mean_rank"] = r
    train = config.get("train") or {}
    return {
        "name": config.get("name"), "seed": config["seed"], "K": config["K"], "config": config,
        "dataset": {"name": data.name, "tasks": data.task_names, "known_groups": data.groups, "info": data.info},
        "reference": ref_name if ref else None,
        "primary_metric": metric,
        "conventions": summary_convention(ref_name if ref else "none (reference method not run)",
                                          "single_task" if stl else None, metric,
                                          train.get("select", "best_val"), train.get("select_metric", "loss")),
        "methods": results,
    }

