"""Saving InterroGate's compiled network on its own: ``model.safetensors`` (weights) and
``architecture.json`` (every module's class, plain attributes, parameter and buffer shapes), from
which :func:`load_compiled` rebuilds it without the gated network or the backbone builders. Only
classes from ``torch.nn``, ``taskgrouping.models`` and this package are ever instantiated.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from taskgrouping.io import atomic_write_json, save_state_dict
from taskgrouping.methods.interrogate.compiled import CompiledInterroGate

__all__ = ["FORMAT", "describe_module", "module_from_description", "save_compiled", "load_compiled"]

FORMAT = "taskgrouping.interrogate.compiled"
#: Modules a saved architecture may name: only library code is ever instantiated.
_ALLOWED_MODULE_PREFIXES = ("torch.nn.modules.", "taskgrouping.models.", "taskgrouping.methods.interrogate.")
_ALLOWED = "a torch.nn, taskgrouping.models or taskgrouping.methods.interrogate module"
#: Where the compiled modules of files saved before they moved into this package now live.
_MOVED = {"taskgrouping.models.gated": "taskgrouping.methods.interrogate.compiled"}
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.bool)}


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    raise ValueError(f"cannot describe {where} (a {type(value).__name__}) in the JSON architecture")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(_decode(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def describe_module(module: nn.Module, path: str = "model") -> dict[str, Any]:
    """A JSON-able description of ``module``: class, plain attributes, parameter and buffer
    shapes and children (weights are stored separately)."""
    cls = type(module)
    if not cls.__module__.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ValueError(f"cannot save {path}: {cls.__module__}.{cls.__qualname__} is not {_ALLOWED}")
    if module._non_persistent_buffers_set:
        raise ValueError(f"cannot save {path}: non-persistent buffers {sorted(module._non_persistent_buffers_set)}")
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "attributes": {k: _encode(v, f"{path}.{k}") for k, v in vars(module).items() if k not in _MODULE_INTERNALS},
        "parameters": {k: None if p is None else {"shape": list(p.shape), "dtype": str(p.dtype)}
                       for k, p in module._parameters.items()},
        "buffers": {k: None if b is None else {"shape": list(b.shape), "dtype": str(b.dtype)}
                    for k, b in module._buffers.items()},
        "children": {k: None if c is None else describe_module(c, f"{path}.{k}") for k, c in module._modules.items()},
    }


def _empty(spec: dict[str, Any], where: str) -> Tensor:
    dtype = _DTYPES.get(spec.get("dtype", ""))
    if dtype is None:
        raise ValueError(f"{where}: unsupported dtype {spec.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
    return torch.empty([int(s) for s in spec["shape"]], dtype=dtype)


def module_from_description(spec: dict[str, Any], path: str = "model") -> nn.Module:
    """Rebuild (with uninitialised weights) the module :func:`describe_module` described. Only
    classes from ``torch.nn``, ``taskgrouping.models`` and this package are instantiated, without
    running their constructors."""
    try:
        qual = spec["class"]
        module_name, _, cls_name = qual.rpartition(".")
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: expected a module description with a 'class' key") from None
    if not module_name.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ValueError(f"{path}: class {qual!r} is not {_ALLOWED}")
    module_name = _MOVED.get(module_name, module_name)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(f"{path}: unknown class {qual!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path}: {qual!r} is not an nn.Module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for k, v in spec.get("attributes", {}).items():
        setattr(module, k, _decode(v))
    for k, p in spec.get("parameters", {}).items():
        if p is None:
            module.register_parameter(k, None)
        else:
            t = _empty(p, f"{path}.{k}")
            module.register_parameter(k, nn.Parameter(t, requires_grad=t.is_floating_point()))
    for k, b in spec.get("buffers", {}).items():
        module.register_buffer(k, None if b is None else _empty(b, f"{path}.{k}"))
    for k, c in spec.get("children", {}).items():
        module.add_module(k, None if c is None else module_from_description(c, f"{path}.{k}"))
    return module


def save_compiled(model: CompiledInterroGate, directory: Path | str) -> Path:
    """Write ``model.safetensors`` (weights) and ``architecture.json`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arch = {"format": FORMAT, "version": 1, "task_names": list(model.task_names),
            "architecture": describe_module(model)}
    save_state_dict(out / "model.safetensors", model.state_dict())
    atomic_write_json(out / "architecture.json", arch, indent=1)
    return out


def _read_architecture(path: Path) -> dict[str, Any]:
    try:
        arch = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    got = arch.get("format") if isinstance(arch, dict) else arch
    if not isinstance(arch, dict) or got != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    return arch


def load_compiled(directory: Path | str, device: str | torch.device = "cpu") -> CompiledInterroGate:
    """Rebuild a network written by :func:`save_compiled` (in eval mode)."""
    d = Path(directory)
    arch_file, weights_file = d / "architecture.json", d / "model.safetensors"
    for f in (arch_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; expected a directory written by save_compiled")
    model = module_from_description(_read_architecture(arch_file)["architecture"])
    if not isinstance(model, CompiledInterroGate):
        raise ValueError(f"{arch_file}: the top module is {type(model).__name__}, expected CompiledInterroGate")
    try:
        model.load_state_dict(load_file(str(weights_file)), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_file} does not fit {arch_file}: {exc}") from None
    return model.to(device).eval()
