"""Grouping on your own data from Python: :func:`group_tasks` runs any registered method (DMTG, HOA,
``label_clusters``, a fixed grouping, ...) on your datasets, tasks and backbone and returns the
grouping, the trained grouped model and its metrics.

It drives the methods exactly as ``taskgrouping run`` does (a :class:`~taskgrouping.methods.base.MethodContext`
handed to the registered method, every network trained by :func:`taskgrouping.engine.fit.fit`), so a
method behaves the same from Python and from the command line; only the data and the backbone come
from you instead of a config. Every bad argument is refused before anything trains, with one
:class:`~taskgrouping.config.ConfigError` line naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from taskgrouping.config import ConfigError
from taskgrouping.data.base import TaskData
from taskgrouping.data.checks import sample_count
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.option_values import short_repr
from taskgrouping.tasks import Task

__all__ = ["group_tasks", "GroupingResult"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class GroupingResult:
    """What :func:`group_tasks` returns.

    Attributes:
        method: the method that ran.
        grouping: the groups it chose and which group serves each task (``.as_lists()``: task-name lists).
        model: the trained grouped model (``model(x) -> {task: prediction}``), ready to use.
        per_task: task -> test metrics (``loss``, ``error``, ``auroc``, ... as the task's kind has them).
        val_per_task: task -> validation metrics of the selected epoch.
        record: everything ``results.json`` records for a method (``total_test_loss``,
            ``train_seconds``, ``n_networks``, the method's own facts such as DMTG's assignment
            probabilities; ``variants``: e.g. DMTG's grouping retrained, when asked for).
        out_dir: where the run's files are, if ``out_dir`` was given.
    """

    method: str
    grouping: Grouping
    model: nn.Module | None
    per_task: dict[str, dict[str, float]]
    val_per_task: dict[str, dict[str, float]]
    record: dict[str, Any]
    out_dir: Path | None = None

    @property
    def groups(self) -> list[list[str]]:
        """The groups as task-name lists."""
        return self.grouping.as_lists()

    @property
    def total_test_loss(self) -> float:
        return float(self.record["total_test_loss"])

    @property
    def train_seconds(self) -> float:
        return float(self.record["train_seconds"])


def group_tasks(method: str, train: Dataset, val: Dataset, test: Dataset, tasks: Sequence[Task], *, K: int = 2,
                backbone: str | nn.Module | Callable[[], nn.Module] | None = None,
                backbone_options: Mapping[str, Any] | None = None, shared_blocks: int = 0,
                training: TrainConfig | Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None,
                balancer: str | Mapping[str, Any] = "ew", seed: int = 0, out_dir: Path | str | None = None,
                name: str = "own_data") -> GroupingResult:
    """Run grouping method ``method`` on your data and return the grouping, the trained model and its metrics.

    Args:
        method: a registered method (``taskgrouping methods`` lists them): ``dmtg``, ``hoa``, ``esa``,
            ``optimal``, ``tag``, ``mtg_net``, ``label_clusters``, ``random``, ``fixed``, ``naive_mtl``, ...
        train, val, test: datasets yielding ``(x, {task_name: target})`` (e.g.
            :class:`~taskgrouping.TensorTaskDataset` or your own ``Dataset``); classification targets
            int64 with ``-1`` for a missing label, regression targets float with ``NaN`` for a missing one.
            ``val`` selects the epoch (and, for the two-shot methods, the networks); ``test`` is scored.
        tasks: the tasks to group, each a :class:`~taskgrouping.Task` named as in the target dicts.
        K: at most this many groups (the two-shot methods' budget in networks, unless ``options`` say).
        backbone: a registered backbone name (default: ``mlp`` for vectors, ``small_cnn`` for images),
            an ``nn.Module`` (deep-copied for every branch and network: each starts from its weights),
            or a zero-argument factory of modules. Heads are added per task.
        backbone_options: options of a registered backbone (e.g. ``{"widths": [64, 32]}``).
        shared_blocks: leading blocks shared by every group (needs an ``nn.Sequential`` backbone).
        training: :class:`~taskgrouping.TrainConfig` or a mapping of its fields (epochs, lr, ...).
        options: the method's options, as in a config's ``<method>:`` section (``taskgrouping methods``).
            With a module backbone, Standley's methods (``hoa``, ``esa``, ``optimal``) default to
            ``half_size: False``: half-size networks scale a registered backbone's width options.
        balancer: a balancer name (``ew``, ``pcgrad``, ...) or ``{"name": ..., "options": {...}}``.
        seed: initialisation, data order and Gumbel noise; the same seed gives the same numbers on CPU.
        out_dir: if given (absent or empty), the run's files are written there as ``taskgrouping run``
            writes them: ``config.yaml``, ``metrics.jsonl``, ``results.json``, ``models/<method>.safetensors``,
            checkpoints, ``figures/`` (DMTG's assignment heatmaps). Otherwise nothing is written.
        name: the dataset's name in messages and records.

    Returns:
        :class:`GroupingResult`.

    Raises:
        ConfigError: one line naming the bad argument (unknown method, K outside 1..N, a task missing
            from the datasets' targets, options the method does not have, a backbone that cannot read
            the inputs, an output directory in use or not empty, ...), before anything is trained.
    """
    from taskgrouping.data.checks import validate_data
    from taskgrouping.methods.base import available_methods, method_options

    methods = available_methods()
    if not isinstance(method, str) or method not in methods:
        raise ConfigError(f"unknown method {short_repr(method)}; expected one of {sorted(methods)}")
    task_list = _check_tasks(tasks)
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= len(task_list):
        raise ConfigError(f"K must be an integer between 1 and the number of tasks ({len(task_list)}), "
                          f"got {short_repr(K)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {short_repr(seed)}")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name must be a non-empty string (the dataset's name in messages), got {short_repr(name)}")
    train_config = _train_config(training)
    section = _method_section(method, options, backbone)
    try:
        opts = method_options(method, section)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    data = _own_data(name, task_list, {"train": train, "val": val, "test": test})
    try:
        validate_data(data)
        opts.check_data(data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    balancer_section = _check_balancer(balancer, method, data)
    if backbone_options is not None and not isinstance(backbone_options, MappingABC):
        raise ConfigError(f"backbone_options must be a mapping of the backbone's options, got "
                          f"{short_repr(backbone_options)}")
    model_section = {"backbone": backbone, "options": dict(backbone_options or {}), "shared_blocks": shared_blocks}
    _check_model(model_section, data)
    described = _described_config(name, method, seed, K, data, model_section, train_config, balancer_section,
                                  section)
    run = dict(method=method, data=data, seed=seed, K=K, train=train_config, model=model_section,
               balancer=balancer_section, options=section)
    if out_dir is None:
        return _group(run)
    return _group_in(Path(out_dir), described, run)


# -- checks -------------------------------------------------------------------------------------------

def _check_tasks(tasks: Any) -> list[Task]:
    from taskgrouping.tasks import validate_task_list

    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or not tasks:
        raise ConfigError(f"tasks must be a non-empty list of taskgrouping.Task, got {short_repr(tasks)}")
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise ConfigError(f"tasks[{i}] must be a taskgrouping.Task (name and kind), got {short_repr(t)}; "
                              "e.g. Task('price', 'regression')")
    try:
        validate_task_list(list(tasks))
    except ValueError as exc:
        raise ConfigError(f"tasks: {exc}") from None
    return list(tasks)


def _train_config(training: Any) -> TrainConfig:
    if training is None:
        return TrainConfig()
    if isinstance(training, TrainConfig):
        return training
    if not isinstance(training, MappingABC):
        raise ConfigError(f"training must be a TrainConfig or a mapping of its fields, got {short_repr(training)}")
    keys = [f.name for f in dataclasses.fields(TrainConfig)]
    for k in training:
        if k not in keys:
            raise ConfigError(f"unknown training key {short_repr(k)}; expected one of {keys}")
    try:
        return TrainConfig(**training)
    except (TypeError, ValueError) as exc:  # TrainConfig names its fields train.<field>
        text = str(exc)
        raise ConfigError("training." + text[len("train."):] if text.startswith("train.") else text) from None


def _method_section(method: str, options: Any, backbone: Any) -> dict[str, Any]:
    """The method's option section; Standley's half-size networks off by default for a module backbone."""
    from taskgrouping.methods.base import METHOD_OPTIONS

    if options is not None and not isinstance(options, MappingABC):
        raise ConfigError(f"options must be a mapping of {method}'s options, got {short_repr(options)}")
    section = dict(options or {})
    if "half_size" in METHOD_OPTIONS[method].keys() and not isinstance(backbone, (str, type(None))):
        if section.get("half_size") is True:
            raise ConfigError(f"{method}.half_size=True needs a registered backbone name (half-size networks scale "
                              "its width options); a module backbone has none: set half_size=False")
        section.setdefault("half_size", False)
    return section


def _own_data(name: str, tasks: list[Task], splits: dict[str, Any]) -> TaskData:
    """The user's splits as :class:`TaskData`, after a look at each split's first sample: a
    ``(x, {task: target})`` pair with a target for every task and inputs of one shape."""
    shape: tuple[int, ...] | None = None
    for split, ds in splits.items():
        if not isinstance(ds, Dataset) and not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise ConfigError(f"{split} must be a torch Dataset yielding (x, {{task: target}}), got {short_repr(ds)}")
        try:
            sample_count(ds, f"{split}: the dataset")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sample = ds[0]
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], MappingABC)
                and isinstance(sample[0], torch.Tensor)):
            raise ConfigError(f"{split}: sample 0 is {short_repr(sample)}; expected a pair (x tensor, "
                              "{task_name: target})")
        x, targets = sample
        missing = [t.name for t in tasks if t.name not in targets]
        if missing:
            raise ConfigError(f"{split}: the dataset has no targets for tasks {missing}; its samples carry "
                              f"{sorted(map(str, targets))}; expected one target per task in tasks")
        if shape is None:
            shape = tuple(int(s) for s in x.shape)
        elif tuple(x.shape) != shape:
            raise ConfigError(f"{split}: inputs have shape {tuple(x.shape)}; expected {shape}, the shape of the "
                              "train inputs")
    try:
        return TaskData(name, tasks, splits["train"], splits["val"], splits["test"], shape or (),
                        info={f"n_{s}": len(d) for s, d in splits.items()})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_balancer(balancer: Any, method: str, data: TaskData) -> dict[str, Any]:
    """The balancer section ``{"name", "options"}``, built once and run once on the tasks."""
    from taskgrouping.balancing.base import check_on_tasks, make_balancer
    from taskgrouping.config import _check_features

    section = {"name": balancer, "options": {}} if isinstance(balancer, str) else balancer
    if not isinstance(section, MappingABC) or set(section) - {"name", "options"} or "name" not in section:
        raise ConfigError(f"balancer must be a balancer name or {{'name': ..., 'options': {{...}}}}, got "
                          f"{short_repr(balancer)}")
    section = {"name": section["name"], "options": dict(section.get("options") or {})}
    try:
        built = make_balancer(section["name"], section["options"], tasks=data.task_names, prefix="balancer.options.")
        check_on_tasks(make_balancer(section["name"], section["options"], tasks=data.task_names), data.task_names)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_features([method], section, built, 0)
    return section


def _check_model(model: dict[str, Any], data: TaskData) -> None:
    """A registered backbone is checked as a config's ``model:`` section is; a module or factory is
    built once, with every head, on the data's input shape (torch's RNG restored)."""
    from taskgrouping.models.branched import build_branched_model
    from taskgrouping.models.checks import check_model

    backbone, shared = model["backbone"], model["shared_blocks"]
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ConfigError(f"shared_blocks must be an integer >= 0, got {short_repr(shared)}")
    if backbone is None or isinstance(backbone, str):
        try:
            check_model(model, data)
        except ValueError as exc:  # named after the config keys; here they are group_tasks' arguments
            text = str(exc)
            for key, arg in (("model.options", "backbone_options"), ("model.shared_blocks", "shared_blocks"),
                             ("model.backbone", "backbone")):
                text = text.replace(key, arg)
            raise ConfigError(text) from None
        return
    if not (isinstance(backbone, nn.Module) or callable(backbone)):
        raise ConfigError(f"backbone must be a registered backbone name, an nn.Module or a factory of modules, "
                          f"got {short_repr(backbone)}")
    if model["options"]:
        raise ConfigError("backbone_options are options of a registered backbone (given by name); a module "
                          "backbone takes none: configure the module itself")
    try:
        with torch.random.fork_rng(devices=[]):
            build_branched_model(data.tasks, [data.task_names], data.input_shape, backbone=backbone,
                                 shared_blocks=shared)
    except Exception as exc:  # any failure of the user's module on these inputs is the user's to fix
        raise ConfigError(f"backbone {type(backbone).__name__} cannot be built into a model for inputs of shape "
                          f"{tuple(data.input_shape)} and tasks {data.task_names} ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())})") from None


def _described_config(name: str, method: str, seed: int, K: int, data: TaskData, model: dict[str, Any],
                      train: TrainConfig, balancer: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """A run config as ``config.yaml`` records it, the backbone module described by its class (JSON-safe)."""
    from taskgrouping.io import strict_json

    backbone = model["backbone"]
    shown = backbone if backbone is None or isinstance(backbone, str) else (
        f"own module {type(backbone).__name__}" if isinstance(backbone, nn.Module) else
        f"own factory {getattr(backbone, '__name__', type(backbone).__name__)}")
    config = {
        "name": name, "seed": seed, "K": K, "methods": [method], "reference": None, "threads": 0,
        "data": {"name": name, "tasks": [dataclasses.asdict(t) for t in data.tasks],
                 "input_shape": list(data.input_shape), **data.info},
        "model": {"backbone": shown, "options": model["options"], "shared_blocks": model["shared_blocks"]},
        "train": dataclasses.asdict(train), "balancer": balancer, "diagnostics": {"every": 0, "level": "feature"},
        method: section,
    }
    return json.loads(strict_json(config))


# -- running -----------------------------------------------------------------------------------------

def _context(run: dict[str, Any], **kw: Any) -> Any:
    from taskgrouping.methods.base import MethodContext

    return MethodContext(data=run["data"], seed=run["seed"], K=run["K"], train=run["train"], model=run["model"],
                         balancer=run["balancer"], options=copy.deepcopy(run["options"]), name=run["method"], **kw)


def _group(run: dict[str, Any], ctx: Any = None) -> GroupingResult:
    """Run the method in ``ctx`` (default: a context that writes nothing) and collect its result."""
    from taskgrouping.experiment import method_record
    from taskgrouping.methods.base import available_methods

    ctx = ctx if ctx is not None else _context(run)
    t0 = time.perf_counter()
    res = available_methods()[run["method"]](ctx)
    variants = res.extra.pop("variants", {})
    record = method_record(res, run["data"])
    record["wall_seconds"] = time.perf_counter() - t0
    record["variants"] = {f"{run['method']}/{v}": method_record(r, run["data"]) for v, r in variants.items()}
    return GroupingResult(run["method"], res.grouping, res.model, res.per_task, res.val_per_task, record)


def _group_in(out: Path, described: dict[str, Any], run: dict[str, Any]) -> GroupingResult:
    """:func:`_group` writing the run's files to ``out`` (checked, locked; removed again if the call
    fails before anything was trained)."""
    from taskgrouping.engine.driver import Driver, discard_on_error
    from taskgrouping.experiment import summarise
    from taskgrouping.io import atomic_write_json, save_state_dict

    method = run["method"]
    with discard_on_error(out), Driver(described, out) as driver:
        driver.check_out_dir()
        driver.open()
        (out / "models").mkdir(exist_ok=True)
        log = driver.logger(out / "metrics.jsonl", method=method)
        ctx = _context(run, workdir=out / "checkpoints" / method, log=log, figures_dir=out / "figures")
        result = _group(run, ctx)
        if result.model is not None:
            save_state_dict(out / "models" / f"{method}.safetensors", result.model.state_dict())
        records = {method: copy.deepcopy(result.record)}
        records.update(records[method].pop("variants", {}) or {})
        summary = summarise(described, run["data"], records)
        summary.update(driver.provenance())
        atomic_write_json(out / "results.json", summary, strict=True)
    return dataclasses.replace(result, out_dir=out)
