"""Config -> run -> results directory.

``DIR/config.yaml`` (the resolved config), ``DIR/metrics.jsonl`` (one record per network and epoch),
``DIR/results.json`` and ``DIR/table.md`` (written atomically at the end, never partially),
``DIR/checkpoints/<method>/<network>/`` (resumable), ``DIR/partial/<method>.json`` (finished
methods, so a resumed run skips them) and ``DIR/models/<method>.safetensors`` (final weights).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from taskgrouping import __version__
from taskgrouping.config import ConfigError, dump
from taskgrouping.data.base import TaskData
from taskgrouping.data.registry import load_dataset
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, available_methods
from taskgrouping.metrics import delta_mtl, mean_rank, norm_gain, summary_convention, total
from taskgrouping.report import results_table
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.io import atomic_write_text


def versions() -> dict[str, str]:
    import numpy
    import scipy

    return {"taskgrouping": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "platform": platform.platform()}


def git_revision() -> str:
    """HEAD of the checkout the package is imported from (``+dirty`` if modified), else ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_data(config: dict[str, Any]) -> TaskData:
    """Load the configured dataset and check K against its tasks."""
    options = {k: v for k, v in config["data"].items() if k != "name"}
    if "seed" not in options and config["data"]["name"] in ("planted", "multimnist", "digits"):
        options["seed"] = config["seed"]
    data = load_dataset(config["data"]["name"], **options)
    n = len(data.tasks)
    if config["K"] > n:
        raise ConfigError(f"K={config['K']} is larger than the number of tasks ({n}) of dataset {data.name!r}")
    return data


def run_experiment(config: dict[str, Any], out_dir: Path | str, resume: bool = False,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``config`` on the same data and write the results directory.

    Raises ``ConfigError`` / ``ValueError`` / ``FileNotFoundError`` before anything is written when
    the config or the data is wrong.
    """
    out = Path(out_dir)
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    data = prepare_data(config)
    methods = available_methods()
    config_text = dump(config)
    if out.exists() and any(out.iterdir()):
        old = out / "config.yaml"
        if not resume:
            raise ConfigError(f"output directory {str(out)!r} is not empty; pass --resume to continue it or "
                              "choose another --out")
        if old.is_file() and old.read_text() != config_text:
            raise ConfigError(f"--resume: the config differs from {old}; resume with the same config")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_text)
    (out / "partial").mkdir(exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    metrics_file = out / "metrics.jsonl"

    def log(method: str) -> Callable[[dict[str, Any]], None]:
        def write(record: dict[str, Any]) -> None:
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps(dict(record, method=method), default=float) + "\n")
        return write

    started = datetime.now(timezone.utc).isoformat()
    train_cfg = TrainConfig(**config["train"])
    cache: dict[str, Any] = {}
    results: dict[str, MethodResult | dict[str, Any]] = {}
    for name in config["methods"]:
        partial = out / "partial" / f"{name}.json"
        ctx = MethodContext(data=data, seed=config["seed"], K=config["K"], train=train_cfg, model=config["model"],
                            balancer=config["balancer"], options=dict(config.get(name) or {}),
                            workdir=out / "checkpoints" / name, resume=resume, log=log(name), cache=cache, name=name,
                            diagnostics=dict(config.get("diagnostics") or {}), figures_dir=out / "figures")
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
            _save_model(out / "models" / f"{name}.safetensors", res.model)
        atomic_write_text(partial, json.dumps(record, indent=1, default=_json_float))
        results[name] = record
        echo(f"[{name}] total test loss {record['total_test_loss']:.4f}; groups {record['grouping']}")
    for name in list(results):  # variants (e.g. DMTG's grouping retrained) become rows of their own
        results.update(results[name].pop("variants", {}) or {})
    summary = summarise(config, data, results)
    summary.update(started=started, finished=datetime.now(timezone.utc).isoformat(), versions=versions(),
                   git_revision=git_revision(), out_dir=str(out))
    table = results_table(summary)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1, default=_json_float))
    atomic_write_text(out / "table.md", table + "\n")
    echo(table)
    return summary


def _json_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return float(obj)


def _save_model(path: Path, model: torch.nn.Module) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


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

