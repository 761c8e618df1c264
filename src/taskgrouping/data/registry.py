"""Dataset registry: config name -> loader returning a :class:`~taskgrouping.data.base.TaskData`.

Loaders take keyword options straight from the ``data:`` section of a config (minus ``name``);
an unknown option is a config error, reported with the dataset's name.
"""

from __future__ import annotations

from typing import Any, Callable

from taskgrouping.data.base import TaskData
from taskgrouping.registry import check_options, import_modules

Loader = Callable[..., TaskData]
DATASETS: dict[str, Loader] = {}
_MODULES = ("builtin", "multimnist_dense", "npz", "celeba", "taskonomy", "nyuv2")


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader to :data:`DATASETS`."""

    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return deco


def available_datasets() -> dict[str, Loader]:
    import_modules("taskgrouping.data", _MODULES)
    return dict(sorted(DATASETS.items()))


def load_dataset(name: str, **options: Any) -> TaskData:
    """Load dataset ``name`` with ``options``; clear errors for unknown names and options."""
    loaders = available_datasets()
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(loaders)}")
    fn = loaders[name]
    check_options(fn, options, f"dataset {name!r}", prefix="data.")
    return fn(**options)
