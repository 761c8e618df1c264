"""Machinery shared by the two-shot grouping methods (Standley's selection, HOA, ESA, TAG, MTG-Net).

"Two-shot": the first shot measures something about task combinations (trained task-subset
networks, lookahead affinities, sampled gains), a search picks the groups, and the second shot
trains the picked groups. The methods themselves live in :mod:`taskgrouping.methods.standley`
(``optimal``, ``hoa``, ``esa``), :mod:`taskgrouping.methods.tag` (``tag``) and
:mod:`taskgrouping.methods.mtg_net` (``mtg_net``); this module holds what they share: turning the
method context into picklable training jobs, running them with the configured backend
(:class:`FanoutOptions`: ``<method>.backend`` / ``<method>.workers``, see
:mod:`taskgrouping.engine.jobs`), logging their epochs, and turning a set of trained networks into
the method's final model and result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from taskgrouping.engine.job_cache import JobCache
from taskgrouping.engine.jobs import (JobResult, TrainingJob, assemble_networks, check_backend,
                                      checkpoint_path, run_jobs, trained_model)
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult
from taskgrouping.methods.options import MethodOptions, expect, expect_number
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.engine.trainer import resolve_device


@dataclass(frozen=True)
class FanoutOptions(MethodOptions):
    """Options of every method that fans trainings out: ``backend`` (``sequential``, ``processes``, ``ray`` or
    ``stacked``: the networks of one shape trained as one, :mod:`taskgrouping.engine.candidate_stack`),
    ``workers`` (processes or Ray tasks at once; ``None`` = one per CPU), and for Ray
    ``ray_address`` (a running cluster; ``None``: ``RAY_ADDRESS`` if set, else a local Ray) and the
    resources of one job, ``cpus_per_job`` and ``gpus_per_job`` (fractions allowed)."""

    backend: str = "sequential"
    workers: int | None = None
    ray_address: str | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0

    def __post_init__(self) -> None:
        try:
            check_backend(self.backend, self.workers)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith("workers") else f"backend: {msg}") from None
        expect(self.ray_address is None or (isinstance(self.ray_address, str) and bool(self.ray_address)),
               "ray_address", "null or a Ray address such as 'ray://head:10001' or 'auto'", self.ray_address)
        expect_number("cpus_per_job", self.cpus_per_job, low=0, low_open=True)
        expect_number("gpus_per_job", self.gpus_per_job, low=0)


def network_tag(ctx: MethodContext, prefix: str, tasks: Sequence[str], suffix: str = "") -> str:
    """A file-name-safe tag naming a network by its tasks' indices, e.g. ``net_0-3`` or ``net_2_half``."""
    index = {t: i for i, t in enumerate(ctx.data.task_names)}
    return f"{prefix}_{'-'.join(str(index[t]) for t in tasks)}{suffix}"


def subset_job(ctx: MethodContext, tag: str, tasks: Sequence[str], **kw: Any) -> TrainingJob:
    """A one-branch network training ``tasks`` (checkpoints under the method's ``tag`` directory)."""
    return TrainingJob(tag, Grouping.partition([list(tasks)]), checkpoint_dir=checkpoint_path(ctx.workdir, tag),
                       resume=ctx.resume, **kw)


def fan_out(ctx: MethodContext, jobs: Sequence[TrainingJob], opts: FanoutOptions,
            backend: str | None = None) -> list[JobResult]:
    """Run ``jobs`` with the method's backend (``opts.backend``, or ``backend`` when given), reusing the
    finished ones of the run's job cache (``ctx.jobs_dir``). Each newly trained job's epoch records go
    to the run's log as it finishes; a job taken from the cache logs one record ``cached: true``."""

    def log(res: JobResult, cached: bool) -> None:
        if cached:
            ctx.log({"network": res.tag, "cached": True, "best_epoch": res.best_epoch})
            return
        for record in res.history:
            ctx.log(dict(record, network=res.tag))

    cache = JobCache(ctx.jobs_dir) if ctx.jobs_dir is not None else None
    return run_jobs(ctx.run, jobs, backend=backend or opts.backend, workers=opts.workers, cache=cache,
                    on_result=log, ray_address=opts.ray_address, cpus_per_job=opts.cpus_per_job,
                    gpus_per_job=opts.gpus_per_job)


@dataclass(eq=False)
class TrainedNetwork:
    """A job, its result and its inference cost (1 = a full-size network)."""

    job: TrainingJob
    result: JobResult
    cost: float = 1.0
    phase: str = "candidate"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.job.tasks)

    def record(self) -> dict[str, Any]:
        """What results.json keeps about the network."""
        return {"tag": self.job.tag, "tasks": list(self.tasks), "cost": self.cost, "phase": self.phase,
                "epochs": self.job.epochs, "train_seconds": self.result.train_seconds,
                "val_loss": self.result.loss("val"), "test_loss": self.result.loss("test")}


def serve_by_validation(ctx: MethodContext, networks: Sequence[TrainedNetwork]) -> dict[str, int]:
    """Task -> index of the network with the task's lowest validation loss (earlier on ties)."""
    serves: dict[str, int] = {}
    best: dict[str, float] = {}
    for k, net in enumerate(networks):
        for t, v in net.result.loss("val").items():
            if t not in best or v < best[t]:
                best[t], serves[t] = v, k
    missing = [t for t in ctx.data.task_names if t not in serves]
    if missing:
        raise ValueError(f"{ctx.name}: tasks {missing} are in none of the chosen networks")
    return {t: serves[t] for t in ctx.data.task_names}


def networks_result(ctx: MethodContext, networks: Sequence[TrainedNetwork], serves: dict[str, int],
                    train_seconds: float, n_networks: int, extra: dict[str, Any], **info: Any) -> MethodResult:
    """The final model made of ``networks`` (branch k = network k), scored on validation and test."""
    jctx = ctx.run
    model = assemble_networks([trained_model(jctx, n.job, n.result) for n in networks], serves)
    model.to(resolve_device(ctx.train.device))
    grouping = Grouping(tuple(n.tasks for n in networks), dict(serves), dict(info))
    _, val_loader, test_loader = ctx.loaders()
    val = evaluate(model, val_loader, ctx.data.tasks)
    test = evaluate(model, test_loader, ctx.data.tasks)
    return MethodResult(grouping, model, test, val, train_seconds, n_networks=n_networks, extra=extra)


def relative_gain(single: float, combined: float, task: str) -> float:
    """``(L_single - L_combined) / L_single``: the relative loss improvement of a task trained in a
    combination over training it alone (positive = the combination helps)."""
    if not math.isfinite(single) or single <= 0:
        raise ValueError(f"task {task!r}: single-task validation loss is {single!r}; the relative gain needs a "
                         "positive loss")
    return (single - combined) / single
