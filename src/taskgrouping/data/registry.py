"""Dataset registry: config name -> loader returning a :class:`~taskgrouping.data.base.TaskData`.

Loaders take keyword options straight from the ``data:`` section of a config (minus ``name``);
an unknown option is a config error, reported with the dataset's name.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from taskgrouping.data.base import TaskData

Loader = Callable[..., TaskData]
DATASETS: dict[str, Loader] = {}
_MODULES = ("builtin", "npz", "celeba", "taskonomy", "nyuv2")


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader to :data:`DATASETS`."""

    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return deco


def _load_modules() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"taskgrouping.data.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"taskgrouping.data.{mod}":
                raise


def available_datasets() -> dict[str, Loader]:
    _load_modules()
    return dict(sorted(DATASETS.items()))


def load_dataset(name: str, **options: Any) -> TaskData:
    """Load dataset ``name`` with ``options``; clear errors for unknown names and options."""
    loaders = available_datasets()
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(loaders)}")
    fn = loaders[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ValueError(f"unknown option(s) data.{', data.'.join(unknown)} for dataset {name!r}; "
                             f"expected some of {sorted(params)}")
    return fn(**options)
