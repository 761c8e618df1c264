"""Saving InterroGate's compiled network on its own: ``model.safetensors`` (weights) and
``architecture.json`` (every module's class, plain attributes, parameter and buffer shapes), from
which :func:`load_compiled` rebuilds it without the gated network or the backbone builders. Only
classes from ``torch.nn``, ``taskgrouping.models`` and this package are ever instantiated.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskgrouping.io import atomic_write_json, save_state_dict
from taskgrouping.methods.interrogate.compiled import CompiledInterroGate
from taskgrouping.readers import expected_layout, load_tensors, read_json

__all__ = ["FORMAT", "describe_module", "module_from_description", "save_compiled", "load_compiled"]

FORMAT = "taskgrouping.interrogate.compiled"
#: Modules a saved architecture may name: only library code is ever instantiated.
_ALLOWED_MODULE_PREFIXES = ("torch.nn.modules.", "taskgrouping.models.", "taskgrouping.methods.interrogate.")
_ALLOWED = "a torch.nn, taskgrouping.models or taskgrouping.methods.interrogate module"
#: Where the compiled modules of files saved before they moved into this package now live.
_MOVED = {"taskgrouping.models.gated": "taskgrouping.methods.interrogate.compiled"}
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
#: Deepest module nesting a description may have.
MAX_MODULE_DEPTH = 24
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


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        if set(value) != {"tuple"} or not isinstance(value["tuple"], list):
            raise ValueError(f"{where}: expected a plain value, a list or {{\"tuple\": [...]}}, got an object with "
                             f"keys {sorted(value)[:5]}")
        return tuple(_decode(v, where) for v in value["tuple"])
    if isinstance(value, list):
        return [_decode(v, where) for v in value]
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


def _section(spec: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = spec.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key!r} must be an object, got {type(value).__name__}")
    return value


def _empty(spec: Any, where: str, device: str | torch.device) -> Tensor:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected null or {{\"shape\": [...], \"dtype\": ...}}, got {type(spec).__name__}")
    dtype = _DTYPES.get(spec.get("dtype")) if isinstance(spec.get("dtype"), str) else None
    if dtype is None:
        raise ValueError(f"{where}: unsupported dtype {spec.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise ValueError(f"{where}: shape must be a list of integers >= 0, got {shape!r}")
    return torch.empty(shape, dtype=dtype, device=device)


def _attribute_name(cls: type, name: str, where: str) -> str:
    """Refuse attribute names that would replace module internals, dunders or the class's methods."""
    static = inspect.getattr_static(cls, name, None)
    if (not name.isidentifier() or name.startswith("__") or name in _MODULE_INTERNALS
            or callable(static) or hasattr(static, "__get__")):
        raise ValueError(f"{where}: attribute {name!r} is not a plain attribute of {cls.__qualname__}")
    return name


def _module_class(spec: Any, path: str) -> type[nn.Module]:
    qual = spec.get("class") if isinstance(spec, dict) else None
    if not isinstance(qual, str):
        raise ValueError(f"{path}: expected a module description with a 'class' key")
    module_name, _, cls_name = qual.rpartition(".")
    if not module_name.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ValueError(f"{path}: class {qual!r} is not {_ALLOWED}")
    module_name = _MOVED.get(module_name, module_name)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError, TypeError):
        raise ValueError(f"{path}: unknown class {qual!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path}: {qual!r} is not an nn.Module")
    if not cls.__module__.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ValueError(f"{path}: class {qual!r} is {cls.__module__}.{cls.__qualname__}, which is not {_ALLOWED}")
    return cls


def module_from_description(spec: dict[str, Any], path: str = "model",
                            device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild (with uninitialised weights, on ``device``; ``"meta"`` allocates nothing) the module
    :func:`describe_module` described. Only classes from ``torch.nn``, ``taskgrouping.models`` and
    this package are instantiated, without running their constructors; a malformed description is a
    ``ValueError`` naming the module path."""
    return _build(spec, path, device, 0)


def _build(spec: Any, path: str, device: str | torch.device, level: int) -> nn.Module:
    if level > MAX_MODULE_DEPTH:
        raise ValueError(f"{path}: modules nested more than {MAX_MODULE_DEPTH} levels deep")
    cls = _module_class(spec, path)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    try:
        for k, v in _section(spec, "attributes", path).items():
            setattr(module, _attribute_name(cls, k, path), _decode(v, f"{path}.{k}"))
        for k, p in _section(spec, "parameters", path).items():
            t = None if p is None else _empty(p, f"{path}.{k}", device)
            module.register_parameter(k, None if t is None else nn.Parameter(t, requires_grad=t.is_floating_point()))
        for k, b in _section(spec, "buffers", path).items():
            module.register_buffer(k, None if b is None else _empty(b, f"{path}.{k}", device))
        for k, c in _section(spec, "children", path).items():
            module.add_module(k, None if c is None else _build(c, f"{path}.{k}", device, level + 1))
    except (KeyError, TypeError) as exc:  # torch's refusals of a name (empty, dotted, taken)
        msg = exc.args[0] if exc.args else exc
        raise ValueError(f"{path}: {msg}") from None
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
    arch = read_json(path, f"the JSON written by save_compiled (format {FORMAT!r})")
    got = arch.get("format") if isinstance(arch, dict) else type(arch).__name__
    if not isinstance(arch, dict) or got != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    if arch.get("version") != 1:
        raise ValueError(f"{path}: unsupported version {arch.get('version')!r}; expected 1")
    if "architecture" not in arch:
        raise ValueError(f"{path}: no 'architecture' key; expected the JSON written by save_compiled")
    return arch


def load_compiled(directory: Path | str, device: str | torch.device = "cpu") -> CompiledInterroGate:
    """Rebuild a network written by :func:`save_compiled` (in eval mode).

    The architecture is rebuilt on the meta device and checked against the weight file's header
    (tensor names, dtypes, shapes) before anything is allocated, so a malformed, truncated or
    foreign file is a ``ValueError`` naming it.
    """
    d = Path(directory)
    arch_file, weights_file = d / "architecture.json", d / "model.safetensors"
    for f in (arch_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; expected a directory written by save_compiled")
    arch = _read_architecture(arch_file)
    try:
        model = module_from_description(arch["architecture"], device="meta")
    except ValueError as exc:
        raise ValueError(f"{arch_file}: {exc}") from None
    if not isinstance(model, CompiledInterroGate):
        raise ValueError(f"{arch_file}: the top module is {type(model).__name__}, expected CompiledInterroGate")
    tensors = load_tensors(weights_file, expected_layout(model.state_dict()), f"the architecture in {arch_file}")
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_file} does not fit {arch_file}: {' '.join(str(exc).split())}") from None
    return model.to(device).eval()
