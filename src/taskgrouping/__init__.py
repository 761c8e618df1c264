"""taskgrouping: which tasks should be learned together, and how.

The public API, for use from Python (the ``taskgrouping`` command covers the same ground):

* data: :class:`Task`, :class:`TaskData`, :class:`TensorTaskDataset`, :func:`load_dataset`;
* models: :func:`build_branched_model`, :class:`BranchedModel`, :func:`save_branched`, :func:`load_branched`;
* training: :func:`train`, :class:`TrainConfig`, :func:`evaluate`, :class:`ObjectiveBase`,
  :class:`CallbackBase`, :class:`StepOutput`, :func:`get_balancer`;
* runs and methods: :func:`build_config`, :func:`run_experiment`, :func:`available_methods`,
  :func:`register_method`, :class:`MethodContext`, :class:`MethodResult`, :class:`MethodOptions`,
  :class:`Grouping`;
* grouping on your own data in one call: :func:`group_tasks` -> :class:`GroupingResult`.

Names are imported on first use, so ``import taskgrouping`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Task": "taskgrouping.tasks",
    "TaskData": "taskgrouping.data.base",
    "TensorTaskDataset": "taskgrouping.data.base",
    "load_dataset": "taskgrouping.data.registry",
    "BranchedModel": "taskgrouping.models.branched",
    "build_branched_model": "taskgrouping.models.branched",
    "save_branched": "taskgrouping.models.branched",
    "load_branched": "taskgrouping.models.branched",
    "train": "taskgrouping.engine.trainer",
    "TrainConfig": "taskgrouping.engine.trainer",
    "evaluate": "taskgrouping.engine.evaluation",
    "ObjectiveBase": "taskgrouping.engine.hooks",
    "CallbackBase": "taskgrouping.engine.hooks",
    "StepOutput": "taskgrouping.engine.hooks",
    "get_balancer": "taskgrouping.balancing.base",
    "build_config": "taskgrouping.config",
    "run_experiment": "taskgrouping.experiment",
    "available_methods": "taskgrouping.methods.base",
    "register_method": "taskgrouping.methods.base",
    "MethodContext": "taskgrouping.methods.base",
    "MethodResult": "taskgrouping.methods.base",
    "MethodOptions": "taskgrouping.methods.options",
    "Grouping": "taskgrouping.grouping.grouping",
    "group_tasks": "taskgrouping.api",
    "GroupingResult": "taskgrouping.api",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'taskgrouping' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
