"""Predictions of a finished run's model: ``taskgrouping predict RUN_DIR --method NAME``.

A run keeps ``config.yaml``, ``results.json`` and each method's weights in
``models/<method>.safetensors`` (a state dict; no code, no pickle). :func:`load_model` rebuilds the
network the way the method built it -- from the config (backbone, options, seed), the data's tasks and
input shape and the method's record in ``results.json`` (its groups, which group serves each task,
the cost of each two-shot network) -- and checks the weight file against it (names, dtypes, shapes)
before loading anything. :func:`load_data` rebuilds the data exactly as ``run`` did
(:func:`~taskgrouping.engine.driver.prepare_data` on the run's config: the same seed draws the same
built-in data) or loads other data with the same tasks.

:func:`predict` makes one pass over a split through :func:`~taskgrouping.engine.evaluation.evaluate`
-- the code that scored the run -- keeping the outputs it scores, so the metrics returned with the
predictions are the run's ``per_task`` on that split (its ``test`` metrics; ``val_per_task`` on
``val``). What is written per task (:meth:`Predictions.columns`):

* ``binary``: the probability of class 1 (softmax of the two logits, as the run's AUROC scores it);
* ``multiclass``: the predicted class id (argmax of the logits);
* ``regression``: the value (``task[i]`` columns for a task with several outputs);
* dense tasks (one prediction per pixel) only to ``.npz``: ``segmentation`` as class ids per pixel
  (N x H x W), ``dense_regression`` / ``normal`` as values (N x C x H x W). A ``.csv`` holds one
  value per task and sample and refuses them.

Row ``i`` (array index ``i``) is sample ``i`` of the split, in the order the data gives it.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from taskgrouping.config import ConfigError, apply_overrides, build_config, load_yaml, parse_override, validate
from taskgrouping.data.base import TaskData, make_loader
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.engine.trainer import TrainConfig, resolve_device, run_branch_mode, set_branch_mode
from taskgrouping.models.stacked import resolve_branch_mode
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.io import atomic_write_bytes, atomic_write_text
from taskgrouping.readers import expected_layout, load_tensors, read_json, read_text
from taskgrouping.tasks import Task

__all__ = ["SPLITS", "OUTPUT_SUFFIXES", "SavedRun", "Predictions", "open_run", "data_config", "load_data",
           "load_model", "predict", "predict_run", "write_predictions", "check_output_path", "check_output_tasks"]

SPLITS = ("train", "val", "test")
OUTPUT_SUFFIXES = (".csv", ".npz")
#: methods whose model joins independently trained one-branch networks (their record lists each one's cost)
TWO_SHOT = ("hoa", "esa", "optimal", "mtg_net")
#: results.json of runs with many networks (MTG-Net's sampled gains, DMTG's histories) is larger than
#: the files :func:`~taskgrouping.readers.read_text` expects by default
MAX_RESULTS_BYTES = 512 * 2**20


@dataclass(frozen=True)
class SavedRun:
    """A finished run directory: its validated config and its ``results.json``."""

    directory: Path
    config: dict[str, Any]
    results: dict[str, Any]

    @property
    def methods(self) -> list[str]:
        return list(self.results["methods"])

    @property
    def task_names(self) -> list[str]:
        return list(self.results["dataset"]["tasks"])

    def record(self, method: str) -> dict[str, Any]:
        """The method's record in results.json (a ``ValueError`` naming the run's methods if absent)."""
        if method not in self.results["methods"]:
            raise ValueError(f"method {method!r} is not in run {str(self.directory)!r}; it has {self.methods}")
        return self.results["methods"][method]

    def weights(self, method: str) -> Path:
        """``models/<method>.safetensors``, which must exist (a clear error for a method that saved none)."""
        self.record(method)
        path = self.directory / "models" / f"{method}.safetensors"
        if "/" in method or not path.is_file():
            what = ("it is a variant row (a retrained grouping), whose model the run does not keep" if "/" in method
                    else f"{str(path)!r} does not exist")
            raise FileNotFoundError(f"method {method!r} of run {str(self.directory)!r} has no saved model: {what}; "
                                    "expected a method whose weights the run saved under models/")
        return path


def open_run(run_dir: Path | str) -> SavedRun:
    """Read and check ``run_dir``'s ``config.yaml`` and ``results.json``."""
    d = Path(run_dir)
    if not d.exists():
        raise FileNotFoundError(f"run directory {str(d)!r} does not exist; expected a directory written by "
                                "`taskgrouping run`")
    if not d.is_dir():
        raise ValueError(f"run directory {str(d)!r} is not a directory; expected a directory written by "
                         "`taskgrouping run`")
    for name in ("config.yaml", "results.json"):
        if not (d / name).is_file():
            hint = (" (the run did not finish: `taskgrouping run --resume --out DIR` completes it)"
                    if name == "results.json" and (d / "config.yaml").is_file() else "")
            raise FileNotFoundError(f"{str(d / name)!r} does not exist{hint}; expected a directory written by "
                                    "`taskgrouping run`")
    config = build_config(d / "config.yaml")
    results = read_json(d / "results.json", "the results.json written by `taskgrouping run`",
                        max_bytes=MAX_RESULTS_BYTES)
    ok = (isinstance(results, dict) and isinstance(results.get("methods"), dict)
          and isinstance(results.get("dataset"), dict) and isinstance(results["dataset"].get("tasks"), list))
    if not ok:
        raise ValueError(f"{str(d / 'results.json')!r} has no 'methods' object or 'dataset.tasks' list; expected "
                         "the results.json written by `taskgrouping run`")
    return SavedRun(d, config, results)


# -- data -----------------------------------------------------------------------------------------

def _data_section(path: Path) -> dict[str, Any]:
    """The data keys of a ``--data`` file: a mapping of them (with ``name``) or ``{data: {...}}``."""
    from taskgrouping.config import MAX_CONFIG_BYTES

    if not path.exists():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist; expected a YAML file of data keys")
    obj = load_yaml(read_text(path, "a YAML file of data keys", max_bytes=MAX_CONFIG_BYTES), f"--data {path}")
    if isinstance(obj, dict) and set(obj) == {"data"}:
        obj = obj["data"]
    if not isinstance(obj, dict) or "name" not in obj:
        raise ConfigError(f"--data {str(path)!r}: expected a mapping of data keys with 'name' (e.g. "
                          "{name: npz, path: new.npz}) or one key 'data' holding it")
    return obj


def data_config(run: SavedRun, data_file: Path | str | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The run's config with its ``data`` section replaced by ``data_file`` (a YAML mapping of data
    keys, or ``{data: {...}}``) and then changed by ``overrides`` (``data.KEY=VALUE``, as ``run --set``
    takes them); everything else (model, seed, batch size) stays the run's. Checked as ``run`` checks it."""
    config = copy.deepcopy(run.config)
    if data_file is not None:
        config["data"] = _data_section(Path(data_file))
    overrides = list(overrides)
    for item in overrides:
        path, _ = parse_override(item)
        if path[0] != "data" or len(path) < 2:
            raise ConfigError(f"--set {item[:80]!r}: predict changes only data.* keys (the model, seed and training "
                              "settings are the run's); e.g. --set data.path=new.npz")
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def _check_same_data(run: SavedRun) -> None:
    """The run's own data must still be what it trained on (files named by ``data.*`` unchanged, as
    ``--resume`` checks them), or the predictions would not be the run's."""
    from taskgrouping.engine.driver import FINGERPRINT_NAME, data_fingerprint, fingerprint_change

    recorded = run.directory / FINGERPRINT_NAME
    if not recorded.is_file():
        return
    before = read_json(recorded, "the data fingerprint written by `taskgrouping run`")
    change = fingerprint_change(before, data_fingerprint(run.config)) if isinstance(before, dict) else None
    if change:
        raise ValueError(f"the data of run {str(run.directory)!r} changed since it ran ({change}); its predictions "
                         "would not be the run's: pass --data FILE or --set data.KEY=VALUE to predict other data")


def _metric_names(task: Task) -> set[str]:
    return set(task.meter().compute())


def load_data(run: SavedRun, config: Mapping[str, Any] | None = None) -> TaskData:
    """The data of ``config`` (default: the run's own, drawn again exactly as ``run`` drew it), with
    its tasks in the run's order. Its tasks must be the run's: the same names, each reporting the
    metrics the run recorded for it (a binary task stays binary)."""
    from taskgrouping.engine.driver import prepare_data

    data = prepare_data(dict(run.config if config is None else config))
    want, have = run.task_names, data.task_names
    if set(want) != set(have) or len(want) != len(have):
        missing, extra = [t for t in want if t not in have], [t for t in have if t not in want]
        raise ValueError(f"the tasks of dataset {data.name!r} do not match the model's (run {str(run.directory)!r}): "
                         f"missing {missing}, not in the model {extra}; expected the tasks {want}")
    reference = next(iter(run.results["methods"].values()), {}).get("per_task") or {}
    for name in want:
        recorded, task = set(reference.get(name) or {}), data.task(name)
        if recorded and not recorded <= _metric_names(task):
            raise ValueError(f"task {name!r} of dataset {data.name!r} is a {task.kind} task, but the model's task "
                             f"{name!r} reported {sorted(recorded)}; expected a task of the same kind")
    return dataclasses.replace(data, tasks=[data.task(n) for n in want])


# -- the model ------------------------------------------------------------------------------------

def _context(run: SavedRun, data: TaskData, method: str) -> Any:
    from taskgrouping.methods.base import MethodContext

    cfg = run.config
    return MethodContext(data=data, seed=cfg["seed"], K=cfg["K"], train=TrainConfig(**cfg["train"]),
                         model=cfg["model"], balancer=cfg["balancer"], options=dict(cfg.get(method) or {}),
                         name=method)


def _grouping(run: SavedRun, method: str, record: Mapping[str, Any]) -> Grouping:
    try:
        return Grouping.from_json({"groups": record["grouping"], "serves": record["serves"]})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{str(run.directory / 'results.json')!r}: methods.{method} has no valid 'grouping' and "
                         f"'serves' ({exc}); expected the record `taskgrouping run` wrote") from None


def _two_shot_model(run: SavedRun, method: str, record: Mapping[str, Any], ctx: Any) -> nn.Module:
    """Branch k = chosen network k (a one-branch network of its tasks, half size when it cost 0.5)."""
    from taskgrouping.engine.fit import build_model
    from taskgrouping.engine.jobs import assemble_networks

    grouping = _grouping(run, method, record)
    chosen = record.get("chosen")
    if not isinstance(chosen, list) or len(chosen) != len(grouping.groups):
        raise ValueError(f"{str(run.directory / 'results.json')!r}: methods.{method}.chosen must list the "
                         f"{len(grouping.groups)} networks of its grouping; expected the record `taskgrouping run` wrote")
    half = record.get("half_size_options")
    networks = [build_model(ctx.run, Grouping.partition([list(g)]),
                            half if isinstance(net, dict) and net.get("cost") == 0.5 else None)
                for g, net in zip(grouping.groups, chosen)]
    return assemble_networks(networks, grouping.serves)


def _interrogate_model(run: SavedRun, method: str) -> nn.Module:
    """InterroGate's compiled network: its architecture as the run saved it beside its checkpoints."""
    from taskgrouping.methods.interrogate.serialization import load_compiled

    directory = run.directory / "checkpoints" / method / "compiled"
    if not (directory / "architecture.json").is_file():
        raise FileNotFoundError(f"method {method!r} of run {str(run.directory)!r}: {str(directory)!r} holds no "
                                "architecture.json; expected the compiled network the run saved there")
    return load_compiled(directory)


def _build(run: SavedRun, method: str, data: TaskData) -> nn.Module:
    """A freshly built network of ``method``'s architecture on ``data`` (weights not loaded)."""
    record = run.record(method)
    ctx = _context(run, data, method)
    if method == "interrogate":
        return _interrogate_model(run, method)
    if method == "cross_stitch":
        from taskgrouping.methods.architectures.cross_stitch import CrossStitchOptions, build_cross_stitch

        opts = ctx.opts(CrossStitchOptions)
        return build_cross_stitch(ctx, float(opts.init_self), opts.granularity)
    if method == "mtan":
        from taskgrouping.methods.architectures.mtan import build_mtan

        return build_mtan(ctx)
    if method in TWO_SHOT:
        return _two_shot_model(run, method, record, ctx)
    # every other method answers with a branched model of its grouping (DMTG's pruned one included)
    return ctx.build_model(_grouping(run, method, record))


def load_model(run: SavedRun, method: str, data: TaskData) -> nn.Module:
    """``method``'s saved model of ``run``, rebuilt for ``data``'s tasks and input shape, in eval mode
    on the CPU. The weight file is checked against the rebuilt architecture (a ``ValueError`` naming
    the tensors that do not fit) before any weight is read."""
    weights = run.weights(method)
    with torch.random.fork_rng(devices=[]):  # building initialises weights from the run seed: no side effect
        model = _build(run, method, data)
    fits = f"method {method!r} rebuilt from {str(run.directory / 'config.yaml')!r} on dataset {data.name!r}"
    model.load_state_dict(load_tensors(weights, expected_layout(model.state_dict()), fits))
    return model.eval()


# -- predictions ----------------------------------------------------------------------------------

def _positive_probability(logits: Tensor) -> Tensor:
    """Probability of class 1 from a binary head's logits, as the task's meter scores it."""
    logits = logits.reshape(logits.shape[0], -1).float()
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)[:, 1]


@dataclass
class Predictions:
    """A split's raw model outputs per task (logits or values, CPU float32), and the metrics the run's
    evaluation computes from them."""

    tasks: list[Task]
    split: str
    outputs: dict[str, Tensor]
    metrics: dict[str, dict[str, float]]

    @property
    def n(self) -> int:
        return int(next(iter(self.outputs.values())).shape[0]) if self.outputs else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """Task name -> what is written for it (see the module docstring), one row per sample."""
        out: dict[str, np.ndarray] = {}
        for t in self.tasks:
            y = self.outputs[t.name]
            if t.kind == "binary":
                out[t.name] = _positive_probability(y).numpy()
            elif t.kind in ("multiclass", "segmentation"):
                out[t.name] = (y.reshape(y.shape[0], -1) if t.kind == "multiclass" else y).argmax(dim=1).numpy()
            elif t.is_dense:
                out[t.name] = y.numpy()
            else:  # one value per sample, or one row of values for a task with several outputs
                y = y.reshape(y.shape[0], -1)
                out[t.name] = (y[:, 0] if y.shape[1] == 1 else y).numpy()
        return out

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> one value per sample (scalar tasks only): the task's name, or ``task[i]``
        for output ``i`` of a regression task with several outputs."""
        check_output_tasks(self.tasks, "FILE.csv")
        cols: dict[str, np.ndarray] = {}
        for name, a in self.arrays().items():
            if a.ndim == 1:
                cols[name] = a
            else:
                cols.update({f"{name}[{i}]": a[:, i] for i in range(a.shape[1])})
        return cols


def predict(model: nn.Module, data: TaskData, split: str = "test", batch_size: int = 128,
            device: torch.device | str = "cpu", branches: str = "auto") -> Predictions:
    """Outputs of ``model`` on ``data``'s ``split`` and their metrics, in one pass through
    :func:`~taskgrouping.engine.evaluation.evaluate` (the same batches and meters as the run's scoring;
    ``branches``: the run's ``train.branches``, so that its copies of a backbone run as they were scored)."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    tasks = list(data.tasks)
    kept: dict[str, list[Tensor]] = {t.name: [] for t in tasks}

    def keep(net: nn.Module, x: Tensor) -> dict[str, Tensor]:
        preds = net(x)
        for t in tasks:
            kept[t.name].append(preds[t.name].detach().float().cpu())
        return preds

    device = torch.device(device)
    model.to(device)
    set_branch_mode(model, resolve_branch_mode(branches, device))
    loader = make_loader(getattr(data, split), batch_size, shuffle=False)
    metrics = evaluate(model, loader, tasks, keep, device)
    outputs = {n: torch.cat(v) if v else torch.empty(0) for n, v in kept.items()}
    return Predictions(tasks, split, outputs, metrics)


def check_output_path(path: Path | str) -> Path:
    """``--out`` must name a ``.csv`` or ``.npz`` file in an existing directory (checked before any work)."""
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {str(p)!r}: expected a file name ending in .csv (scalar tasks) or .npz (one array "
                         "per task, dense tasks too)")
    if p.is_dir():
        raise ValueError(f"--out {str(p)!r} is a directory; expected a .csv or .npz file name")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"--out {str(p)!r}: the directory {str(p.parent)!r} does not exist")
    return p


def check_output_tasks(tasks: Iterable[Task], path: Path | str) -> None:
    """A ``.csv`` holds one value per task and sample: dense tasks go to an ``.npz``."""
    if Path(path).suffix.lower() != ".csv":
        return
    dense = [t for t in tasks if t.is_dense]
    if dense:
        raise ValueError(f"task {dense[0].name!r} is a {dense[0].kind} task (one prediction per pixel); a CSV holds "
                         f"one value per task and sample: write --out {Path(path).with_suffix('.npz')} (one array "
                         "per task) instead")


def write_predictions(predictions: Predictions, path: Path | str) -> Path:
    """Write ``predictions`` atomically: a CSV with one column per task (scalar tasks), or an ``.npz``
    with one array per task, named after it."""
    p = check_output_path(path)
    if p.suffix.lower() == ".csv":
        import pandas as pd

        atomic_write_text(p, pd.DataFrame(predictions.columns()).to_csv(index=False))
    else:
        buffer = io.BytesIO()
        np.savez(buffer, **predictions.arrays())
        atomic_write_bytes(p, buffer.getvalue())
    return p


def predict_run(run_dir: Path | str, method: str, split: str = "test", data_file: Path | str | None = None,
                overrides: Iterable[str] = (), device: str | None = None,
                out: Path | str | None = None) -> tuple[SavedRun, Predictions]:
    """Open ``run_dir``, rebuild its data (or ``data_file`` / ``overrides``, see :func:`data_config`) and
    ``method``'s model, and predict ``split`` with the run's batch size on ``device`` (default the
    run's ``train.device``). ``out``, the file the predictions will go to, is checked against the
    tasks before the model is loaded (dense tasks need an ``.npz``)."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    run = open_run(run_dir)
    run.weights(method)  # a method that is not there or saved nothing: before the data is loaded
    overrides = list(overrides)
    own = data_file is None and not overrides
    config = run.config if own else data_config(run, data_file, overrides)
    if own:
        _check_same_data(run)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    data = load_data(run, config)
    if out is not None:
        check_output_tasks(data.tasks, out)
    model = load_model(run, method, data)
    train = TrainConfig(**run.config["train"])
    where = resolve_device(device or train.device)
    return run, predict(model, data, split, train.batch_size, where, run_branch_mode(train, where))
