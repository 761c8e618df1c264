"""Config -> run -> results directory.

``DIR/config.yaml`` (the resolved config), ``DIR/metrics.jsonl`` (one record per network and epoch),
``DIR/results.json`` and ``DIR/table.md`` (written atomically at the end, never partially),
``DIR/checkpoints/<method>/<network>/`` (resumable), ``DIR/partial/<method>.json`` (finished
methods, so a resumed run skips them) and ``DIR/models/<method>.safetensors`` (final weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from taskgrouping.config import ConfigError
from taskgrouping.data.base import TaskData
from taskgrouping.engine.driver import Driver, prepare_data
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.io import atomic_write_text, save_state_dict
from taskgrouping.methods.base import MethodContext, MethodResult, available_methods, method_options
from taskgrouping.metrics import delta_mtl, mean_rank, norm_gain, summary_convention, total
from taskgrouping.report import results_table


def run_experiment(config: dict[str, Any], out_dir: Path | str, resume: bool = False,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``config`` on the same data and write the results directory.

    Raises ``ConfigError`` / ``ValueError`` / ``FileNotFoundError`` before anything is written when
    the config or the data is wrong.
    """
    driver = Driver(config, out_dir, resume)
    out = driver.out
    data = prepare_data(config)
    methods = available_methods()
    for name in config["methods"]:  # options that cannot work on this data, before anything is written
        try:
            method_options(name, config.get(name)).check_data(data)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    driver.check_out_dir(can_resume=True)
    driver.open()
    (out / "partial").mkdir(exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    cache: dict[str, Any] = {}
    results: dict[str, MethodResult | dict[str, Any]] = {}
    for name in config["methods"]:
        partial = out / "partial" / f"{name}.json"
        ctx = driver.context(data, name, workdir=out / "checkpoints" / name, log=driver.logger(metrics_file, method=name),
                             cache=cache, figures_dir=out / "figures", diagnostics=True)
        if resume and partial.is_file():
            results[name] = json.loads(partial.read_text())
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
        atomic_write_text(partial, json.dumps(record, indent=1, default=_json_float))
        results[name] = record
        echo(f"[{name}] total test loss {record['total_test_loss']:.4f}; groups {record['grouping']}")
    for name in list(results):  # variants (e.g. DMTG's grouping retrained) become rows of their own
        results.update(results[name].pop("variants", {}) or {})
    summary = summarise(config, data, results)
    summary.update(driver.provenance())
    table = results_table(summary)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1, default=_json_float))
    atomic_write_text(out / "table.md", table + "\n")
    echo(table)
    return summary


def _json_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return float(obj)


def _restore_naive(ctx: MethodContext, out: Path, record: dict[str, Any]) -> None:
    """Put the finished naive-MTL model back in the cache so warm starts after a resume reuse it."""
    weights = out / "models" / "naive_mtl.safetensors"
    if weights.is_file():
        model = ctx.build_model(Grouping.from_json({"groups": record["grouping"], "serves": record["serves"]}))
        model.load_state_dict(load_file(str(weights)))
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
    rec.update(res.extra)
    return rec


def summarise(config: dict[str, Any], data: TaskData, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add NormGain (vs the reference), Delta_MTL (vs single_task) and mean rank to every method."""
    ref_name = config.get("reference", "naive_mtl")
    ref = results.get(ref_name)
    stl = results.get("single_task")
    classification = [t.name for t in data.tasks if t.kind in ("binary", "multiclass")]
    primary = {t.name: [t.primary_metric] for t in data.tasks}
    for rec in results.values():
        pt = rec["per_task"]
        rec["norm_gain_l"] = norm_gain(pt, ref["per_task"], "loss") if ref else None
        rec["norm_gain_e"] = (norm_gain(pt, ref["per_task"], "error", classification)
                              if ref and classification else None)
        rec["delta_mtl"] = delta_mtl(pt, stl["per_task"], primary) if stl else None
    ranks = mean_rank({m: r["per_task"] for m, r in results.items()}, {t.name: t.primary_metric for t in data.tasks})
    for m, r in ranks.items():
        results[m]["mean_rank"] = r
    return {
        "name": config.get("name"), "seed": config["seed"], "K": config["K"], "config": config,
        "dataset": {"name": data.name, "tasks": data.task_names, "known_groups": data.groups, "info": data.info},
        "reference": ref_name if ref else None,
        "conventions": summary_convention(ref_name if ref else "none (reference method not run)",
                                          "single_task" if stl else None),
        "methods": results,
    }

