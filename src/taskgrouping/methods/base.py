"""What every method receives and returns, and the method registry.

A method is a function ``(ctx: MethodContext) -> MethodResult``. The context carries the data, the
seed, K, the model and training settings and the method's own option section; the result carries
the grouping it chose, the model that answers for every task and its test metrics. The experiment
runner turns results into ``results.json`` and the comparison table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from torch import nn
from torch.utils.data import DataLoader

from taskgrouping.data.base import TaskData, make_loader
from taskgrouping.engine.fit import Fitted, RunContext, build_model, fit
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.options import MethodOptions
from taskgrouping.models.branched import BranchedModel
from taskgrouping.engine.trainer import TrainConfig

O = TypeVar("O", bound=MethodOptions)


@dataclass
class MethodContext:
    """Everything a method may use. ``cache`` is shared by the methods of one run (e.g. the trained
    naive-MTL model that warm starts use); ``jobs_dir`` is the job cache of the fanned-out trainings
    (:mod:`taskgrouping.engine.job_cache`), keyed on ``data_key``, the data's fingerprint."""

    data: TaskData
    seed: int
    K: int
    train: TrainConfig
    model: dict[str, Any]
    balancer: dict[str, Any]
    options: dict[str, Any]
    workdir: Path | None = None
    resume: bool = False
    log: Callable[[dict[str, Any]], None] = lambda record: None
    cache: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    figures_dir: Path | None = None
    jobs_dir: Path | None = None
    data_key: str = ""

    def loaders(self) -> tuple[DataLoader, DataLoader, DataLoader]:
        """(train shuffled, val, test) loaders with the configured batch size."""
        bs = self.train.batch_size
        return (make_loader(self.data.train, bs, shuffle=True), make_loader(self.data.val, bs, shuffle=False),
                make_loader(self.data.test, bs, shuffle=False))

    @property
    def run(self) -> RunContext:
        """What every network of this run shares (see :class:`~taskgrouping.engine.fit.RunContext`)."""
        return RunContext(self.data, self.seed, self.train, dict(self.model), dict(self.balancer),
                          dict(self.diagnostics), self.data_key)

    def build_model(self, grouping: Grouping) -> BranchedModel:
        """A freshly initialised branched model for ``grouping`` (:func:`~taskgrouping.engine.fit.build_model`)."""
        return build_model(self.run, grouping)

    def fit(self, model: nn.Module, tag: str, score_test: bool = True, **train_kw: Any) -> Fitted:
        """Train ``model`` as network ``tag`` of this method (checkpoints under ``tag``, log records and
        the progress bar named after it) through :func:`~taskgrouping.engine.fit.fit`."""
        return fit(self.run, model, tag=tag, checkpoint_dir=self.checkpoint_dir(tag), resume=self.resume,
                   log=self.log, score_test=score_test, desc=f"{self.name}:{tag}", **train_kw)

    def checkpoint_dir(self, tag: str) -> Path | None:
        return None if self.workdir is None else self.workdir / tag

    def opts(self, cls: type[O]) -> O:
        """This method's options as the dataclass ``cls`` (checked; defaults filled in; errors name
        the method that registered ``cls``)."""
        name = self.name if METHOD_OPTIONS.get(self.name) is cls else next(
            (n for n, c in METHOD_OPTIONS.items() if c is cls), self.name)
        return cls.from_section(name, self.options)


@dataclass
class MethodResult:
    """A method's outcome on the test split.

    Attributes:
        grouping: the groups trained and which serves each task.
        model: the model that answers for every task (``model(x) -> {task: prediction}``).
        per_task: task -> test metrics.
        val_per_task: task -> validation metrics of the selected epoch.
        train_seconds: wall time of all training the method did (searches included).
        n_networks: number of networks trained (a K-branch model counts once).
        extra: method-specific facts recorded in results.json.
    """

    grouping: Grouping
    model: nn.Module | None
    per_task: dict[str, dict[str, float]]
    val_per_task: dict[str, dict[str, float]]
    train_seconds: float
    n_networks: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[MethodContext], MethodResult]
METHODS: dict[str, MethodFn] = {}
#: option keys each method accepts (validated against the config's method section)
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {}


def register_method(name: str, options: type[MethodOptions] = MethodOptions) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method and the dataclass of its options."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        METHOD_OPTIONS[name] = options
        return fn

    return deco


def method_options(name: str, section: Mapping[str, Any] | None) -> MethodOptions:
    """The options of method ``name`` from its config section (:class:`OptionError` on a bad key or value)."""
    return METHOD_OPTIONS[name].from_section(name, section)


_MODULES = ("baselines", "dmtg", "standley", "tag", "mtg_net", "interrogate", "architectures",
            "label_clusters")


def available_methods() -> dict[str, MethodFn]:
    from taskgrouping.registry import import_modules

    import_modules("taskgrouping.methods", _MODULES)
    return dict(METHODS)
