"""Run configuration: defaults, presets, YAML files and ``--set key=value`` overrides.

A config is a plain nested dict. Top-level keys: ``seed``, ``K``, ``methods``, ``data``, ``model``,
``train``, ``balancer``, ``threads``, ``reference``, ``name``, plus one optional section per method
named after it (e.g. ``dmtg: {tau: 2.5}``). Every key is checked; an unknown one is an error that
names it and lists the valid ones.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from taskgrouping.engine.trainer import TrainConfig

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
DIAGNOSTICS_KEYS = ("every", "level")
MODEL_KEYS = ("backbone", "options", "shared_blocks")
BALANCER_KEYS = ("name", "options")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("taskgrouping.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
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
        raise ConfigError(f"--set {item!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
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
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        config = merge(config, _read_yaml(p.read_text(), str(p)))
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    """Check every key and the types that can be checked without loading data."""
    from taskgrouping.methods.base import available_methods, method_options

    methods = available_methods()
    allowed = set(DEFAULTS) | set(methods)
    for key in config:
        if key not in allowed:
            raise ConfigError(f"unknown config key {key!r}; expected one of {sorted(allowed)}")
    if not isinstance(config["seed"], int) or isinstance(config["seed"], bool):
        raise ConfigError(f"seed must be an integer, got {config['seed']!r}")
    if not isinstance(config["K"], int) or isinstance(config["K"], bool) or config["K"] < 1:
        raise ConfigError(f"K must be an integer >= 1, got {config['K']!r}")
    if not isinstance(config["threads"], int) or config["threads"] < 0:
        raise ConfigError(f"threads must be an integer >= 0 (0 = torch's default), got {config['threads']!r}")
    ms = config["methods"]
    if isinstance(ms, str):
        ms = config["methods"] = [ms]
    if not isinstance(ms, list) or not ms:
        raise ConfigError(f"methods must be a non-empty list of method names, got {ms!r}")
    for m in ms:
        if m not in methods:
            raise ConfigError(f"unknown method {m!r}; expected one of {sorted(methods)}")
    if len(set(ms)) != len(ms):
        raise ConfigError(f"methods lists a method twice: {ms}")
    for m in methods:
        section = config.get(m)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{m} must be a mapping of options, got {section!r}")
    for m in methods:  # every method's options, values included, before anything trains
        if m in ms or config.get(m) is not None:
            try:
                method_options(m, config.get(m))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    data = config["data"]
    if not isinstance(data, dict) or not data.get("name"):
        raise ConfigError("data.name is required (e.g. planted, multimnist, npz)")
    _check_section(config, "model", MODEL_KEYS)
    _check_section(config, "balancer", BALANCER_KEYS)
    _check_section(config, "diagnostics", DIAGNOSTICS_KEYS)
    diag = config["diagnostics"]
    if not isinstance(diag.get("every", 0), int) or diag.get("every", 0) < 0:
        raise ConfigError(f"diagnostics.every must be an integer >= 0 (0 = off), got {diag.get('every')!r}")
    if diag.get("level", "feature") not in ("param", "feature"):
        raise ConfigError(f"diagnostics.level must be 'param' or 'feature', got {diag.get('level')!r}")
    train_keys = [f.name for f in fields(TrainConfig)]
    _check_section(config, "train", train_keys)
    try:
        TrainConfig(**config["train"])
    except (TypeError, ValueError) as exc:
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
    return yaml.safe_dump(config, sort_keys=False)
