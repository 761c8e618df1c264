"""Run configuration: defaults, presets, YAML files and ``--set key=value`` overrides.

A config is a plain nested dict. Top-level keys: ``seed``, ``K``, ``methods``, ``data``, ``model``,
``train``, ``balancer``, ``threads``, ``reference``, ``name`` (and, optional, ``jobs_dir`` and
``primary_metric``), plus one optional section per method
named after it (e.g. ``dmtg: {tau: 2.5}``). Every key is checked; an unknown one is an error that
names it and lists the valid ones.
"""

from __future__ import annotations

import copy
import re
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import yaml

from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.metrics import PER_TASK_PRIMARY, PRIMARY_METRICS, tasks_with_metric
from taskgrouping.option_values import short_repr

if TYPE_CHECKING:
    from taskgrouping.data.base import TaskData

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "K": 3,
    "methods": ["naive_mtl", "single_task", "random"],
    "reference": "naive_mtl",
    "threads": 1,
    "data": {"name": "planted"},
    "model": {"backbone": None, "options": {}, "shared_blocks": 0},
    "train": {},
    "balancer": {"name": "ew", "options": {}},
    "diagnostics": {"every": 0, "level": "feature"},
}
#: top-level keys that may be absent: ``jobs_dir``, a job cache shared by several runs (default
#: ``DIR/jobs``), see :mod:`taskgrouping.engine.job_cache`; ``primary_metric``, the metric behind
#: NormGain_M and the mean rank (default ``task``: each task's own metric, no NormGain_M), see
#: :mod:`taskgrouping.metrics`
OPTIONAL_KEYS = ("jobs_dir", "primary_metric")
DIAGNOSTICS_KEYS = ("every", "level")
MODEL_KEYS = ("backbone", "options", "shared_blocks")
BALANCER_KEYS = ("name", "options")

#: YAML limits, checked on the parser's events before anything is built: aliases (``*name``; a
#: "billion laughs" document expands exponentially through them), nesting depth, file size.
MAX_YAML_ALIASES = 8
MAX_YAML_DEPTH = 32
MAX_CONFIG_BYTES = 2**20
#: ``name`` becomes the folder ``runs/<name>-<date>``: one path component of at most this length.
MAX_NAME_LENGTH = 100
_INT64 = (-(2**63), 2**63 - 1)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("taskgrouping.presets").iterdir() if p.name.endswith(".yaml"))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


class _Dumper(yaml.SafeDumper):
    """Quotes the strings :class:`_Loader` would read as floats, so that a dumped config reads back the same."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text`` (from ``source``, named in errors) after checking its events: at most
    :data:`MAX_YAML_ALIASES` aliases and :data:`MAX_YAML_DEPTH` levels of nesting, so that nothing
    is expanded or deep-copied before the limits hold."""
    aliases = depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise ConfigError(f"{source}: uses more than {MAX_YAML_ALIASES} YAML aliases (*name); expected "
                                      "a plain config (aliases can expand a small file exponentially)")
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{source}: YAML nested more than {MAX_YAML_DEPTH} levels deep; expected a "
                                      "config of a few levels")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    obj = load_yaml(text, source)
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(obj).__name__}")
    return obj


def load_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; expected one of {names}")
    text = resources.files("taskgrouping.presets").joinpath(f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name}")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins; lists are replaced, not concatenated."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.n_tasks=16"`` -> (["data", "n_tasks"], 16); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set data.n_tasks=16")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {item[:80]!r}: empty key component")
    if len(path) > MAX_YAML_DEPTH:
        raise ConfigError(f"--set {key[:80]}: a key of {len(path)} parts; expected at most {MAX_YAML_DEPTH}")
    if not raw.strip():
        return path, ""
    try:
        value = load_yaml(raw, f"--set {key.strip()}")
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise
        value = raw  # not YAML: the text itself
    return path, value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
    return out


def build_config(path: str | Path | None = None, preset: str | None = None,
                 overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults <- preset <- config file <- overrides, then :func:`validate`."""
    config = copy.deepcopy(DEFAULTS)
    if preset:
        config = merge(config, load_preset(preset))
    if path is not None:
        from taskgrouping.readers import read_text

        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            text = read_text(p, "a YAML config file", max_bytes=MAX_CONFIG_BYTES)
        except (OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        config = merge(config, _read_yaml(text, str(p)))
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    """Check every key, type and range that can be checked without loading data: the run's name
    first, then the top-level keys, every method's options, the data, model, balancer (built once),
    diagnostics and training sections, and which methods the balancer can work with."""
    from taskgrouping.methods.base import available_methods, method_options

    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping of config keys, got {type(config).__name__}")
    check_name(config.get("name"))
    methods = available_methods()
    allowed = set(DEFAULTS) | set(OPTIONAL_KEYS) | set(methods)
    for key in config:
        if key not in allowed:
            raise ConfigError(f"unknown config key {short_repr(key)}; expected one of {sorted(allowed)}")
    _check_int("seed", config["seed"], *_INT64)
    _check_int("K", config["K"], 1)
    _check_int("threads", config["threads"], 0, 4096, "(0 = torch's default)")
    ms = config["methods"]
    if isinstance(ms, str):
        ms = config["methods"] = [ms]
    if not isinstance(ms, list) or not ms:
        raise ConfigError(f"methods must be a non-empty list of method names, got {short_repr(ms)}")
    for i, m in enumerate(ms):
        if not isinstance(m, str):
            raise ConfigError(f"methods[{i}] must be a method name, got {short_repr(m)}; expected one of {sorted(methods)}")
        if m not in methods:
            raise ConfigError(f"unknown method {m!r}; expected one of {sorted(methods)}")
    if len(set(ms)) != len(ms):
        raise ConfigError(f"methods lists a method twice: {ms}")
    if config.get("reference") is not None and not isinstance(config["reference"], str):
        raise ConfigError(f"reference must be a method name (or null), got {short_repr(config['reference'])}")
    _check_primary_metric(config.get("primary_metric", PER_TASK_PRIMARY))
    jobs_dir = config.get("jobs_dir")
    if jobs_dir is not None and (not isinstance(jobs_dir, str) or not jobs_dir.strip() or "\0" in jobs_dir):
        raise ConfigError(f"jobs_dir must be a directory path (or null for DIR/jobs), got {short_repr(jobs_dir)}")
    for m in methods:
        section = config.get(m)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{m} must be a mapping of options, got {short_repr(section)}")
    for m in methods:  # every method's options, values included, before anything trains
        if m in ms or config.get(m) is not None:
            try:
                method_options(m, config.get(m))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    _check_data_section(config)
    _check_section(config, "model", MODEL_KEYS)
    _check_model_section(config["model"])
    _check_section(config, "balancer", BALANCER_KEYS)
    balancer = _check_balancer(config["balancer"])
    _check_section(config, "diagnostics", DIAGNOSTICS_KEYS)
    diag = config["diagnostics"]
    _check_int("diagnostics.every", diag.get("every", 0), 0, None, "(0 = off)")
    if diag.get("level", "feature") not in ("param", "feature"):
        raise ConfigError(f"diagnostics.level must be 'param' or 'feature', got {short_repr(diag.get('level'))}")
    _check_features(ms, config["balancer"], balancer, int(diag.get("every", 0) or 0))
    train_keys = [f.name for f in fields(TrainConfig)]
    _check_section(config, "train", train_keys)
    try:
        TrainConfig(**config["train"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def check_name(name: Any) -> None:
    """``name`` (the run folder ``runs/<name>-<date>``) is one plain path component: no separators,
    no ``..``, no control characters, at most :data:`MAX_NAME_LENGTH` characters; null or empty
    means the default folder name."""
    if name is None or name == "":
        return
    expected = (f"expected a plain run name (one folder name of at most {MAX_NAME_LENGTH} characters, without "
                "'/', '\\', '..' or control characters)")
    if not isinstance(name, str):
        raise ConfigError(f"name must be a string, got {short_repr(name)}; {expected}")
    if (len(name) > MAX_NAME_LENGTH or "/" in name or "\\" in name or ".." in name or name.strip() in ("", ".")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ConfigError(f"name {short_repr(name)} is not allowed; {expected}")


def _check_primary_metric(value: Any) -> None:
    choices = (PER_TASK_PRIMARY,) + PRIMARY_METRICS
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"primary_metric must be one of {list(choices)} ('{PER_TASK_PRIMARY}': each task's own "
                          f"metric), got {short_repr(value)}")


def _check_metric_on_data(key: str, metric: str, data: TaskData) -> None:
    """``metric`` (of config key ``key``) is reported by at least one task of ``data``."""
    if metric in (PER_TASK_PRIMARY, "loss") or tasks_with_metric(data.tasks, metric):
        return
    kinds = sorted({t.kind for t in data.tasks})
    which = "binary tasks only" if metric in ("auroc", "average_precision") else "binary and multi-class tasks"
    raise ConfigError(f"{key}={metric}: dataset {data.name!r} has no task that reports {metric} ({metric} is "
                      f"defined for {which}; its tasks are {', '.join(kinds)}); expected 'loss'"
                      + (" or 'error'" if tasks_with_metric(data.tasks, "error") else "")
                      + (f" or '{PER_TASK_PRIMARY}'" if key == "primary_metric" else ""))


def _check_int(key: str, value: Any, low: int | None = None, high: int | None = None, note: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f" between {low} and {high}" if low is not None and high is not None else (
            f" >= {low}" if low is not None else "")
        raise ConfigError(f"{key} must be an integer{bounds}{' ' + note if note else ''}, got {short_repr(value)}")


def _check_data_section(config: dict[str, Any]) -> None:
    from taskgrouping.data.registry import check_dataset_options

    data = config["data"]
    if not isinstance(data, dict) or not data.get("name"):
        raise ConfigError("data.name is required (e.g. planted, multimnist, npz)")
    try:
        check_dataset_options(data["name"], {k: v for k, v in data.items() if k != "name"})
    except ValueError as exc:
        raise ConfigError(f"data.name: {exc}" if not isinstance(data["name"], str) else str(exc)) from None


def _check_model_section(model: dict[str, Any]) -> None:
    from taskgrouping.models.backbones import check_backbone_options

    options = model.get("options")
    if options is None:
        options = model["options"] = {}
    if not isinstance(options, dict):
        raise ConfigError(f"model.options must be a mapping of backbone options, got {short_repr(options)}")
    _check_int("model.shared_blocks", model.get("shared_blocks", 0), 0)
    if model.get("backbone") is None:
        return  # the default backbone depends on the input shape: checked with the data
    try:
        check_backbone_options(model["backbone"], options, prefix="model.options.")
    except ValueError as exc:
        raise ConfigError(f"model.backbone: {exc}" if "unknown backbone" in str(exc) else str(exc)) from None


def _check_balancer(section: dict[str, Any]) -> Any:
    """The balancer the config asks for, built once (name, option names and values checked)."""
    from taskgrouping.balancing.base import make_balancer

    try:
        return make_balancer(section.get("name", "ew"), section.get("options") or {}, prefix="balancer.options.")
    except ValueError as exc:
        raise ConfigError(f"balancer.name: {exc}" if str(exc).startswith("unknown balancer") else str(exc)) from None


def _check_features(methods: list[str], section: dict[str, Any], balancer: Any, every: int) -> None:
    """Feature-level balancers and the diagnostics need shared features some methods do not give
    (their options class says so: :attr:`~taskgrouping.methods.options.MethodOptions.gives_features`)."""
    from taskgrouping.methods.base import METHOD_OPTIONS

    for m in methods:
        if METHOD_OPTIONS[m].gives_features:
            continue
        if getattr(balancer, "uses_features", False):
            raise ConfigError(f"balancer {section.get('name')!r} works on the shared features the heads read, but "
                              f"method {m!r} gives none; use a parameter-level balancer (balancer.options."
                              f"feature_level=false, or 'mgda' for 'mgda_ub') or drop {m!r} from methods")
        if every > 0:
            raise ConfigError(f"diagnostics.every={every}: the diagnostics need the shared features the heads read, "
                              f"but method {m!r} gives none; set diagnostics.every=0 or drop {m!r} from methods")


def check_config_against_data(config: dict[str, Any], data: TaskData) -> None:
    """What needs the data, before anything is written: K against the tasks, the model (backbone,
    options, shared blocks, heads) built for the data's input shape and tasks, and the balancer
    built for its tasks. Every error is a :class:`ConfigError` naming the key."""
    from taskgrouping.balancing.base import check_on_tasks, make_balancer
    from taskgrouping.models.checks import check_model

    n = len(data.tasks)
    _check_metric_on_data("primary_metric", config.get("primary_metric", PER_TASK_PRIMARY), data)
    _check_metric_on_data("train.select_metric", TrainConfig(**config["train"]).select_metric, data)
    if config["K"] > n:
        raise ConfigError(f"K={config['K']} is larger than the number of tasks ({n}) of dataset {data.name!r}")
    try:
        check_model(config["model"], data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    section = config["balancer"]
    try:
        check_on_tasks(make_balancer(section.get("name", "ew"), section.get("options") or {}, tasks=data.task_names,
                                     prefix="balancer.options."), data.task_names)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_section(config: dict[str, Any], name: str, keys: Iterable[str]) -> None:
    section = config.get(name)
    if not isinstance(section, dict):
        raise ConfigError(f"{name} must be a mapping, got {section!r}")
    keys = list(keys)
    for k in section:
        if k not in keys:
            raise ConfigError(f"unknown config key {name}.{k}; expected one of {[f'{name}.{x}' for x in keys]}")


def dump(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)
