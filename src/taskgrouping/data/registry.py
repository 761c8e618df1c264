"""Dataset registry: config name -> loader returning a :class:`~taskgrouping.data.base.TaskData`.

Loaders take keyword options straight from the ``data:`` section of a config (minus ``name``);
an unknown option is a config error, reported with the dataset's name.
"""

from __future__ import annotations

from typing import Any, Callable

from taskgrouping.data.base import TaskData
from taskgrouping.option_values import check_factory_options
from taskgrouping.registry import import_modules

Loader = Callable[..., TaskData]
DATASETS: dict[str, Loader] = {}
_MODULES = ("builtin", "multimnist_dense", "npz", "table", "celeba", "taskonomy", "nyuv2", "pascal_context",
            "cityscapes")


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
    check_dataset_options(name, options)
    return DATASETS[name](**options)


def check_dataset_options(name: Any, options: dict[str, Any]) -> None:
    """``name`` is a registered dataset and ``options`` are options its loader accepts, each of the
    annotated type (``ValueError`` naming ``data.<key>``); ranges are the loader's own checks."""
    loaders = available_datasets()
    if not isinstance(name, str) or name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(loaders)}")
    check_factory_options(loaders[name], options, f"dataset {name!r}", prefix="data.")
