"""Fan-out of independent trainings: the candidate networks of the two-shot grouping methods.

Standley's selection, HOA, ESA and MTG-Net train many task-subset networks that do not depend on
each other. Each is described by a picklable :class:`TrainingJob` (the grouping to train, an
optional model-option override such as a half-size encoder, an optional epoch count, a checkpoint
directory); the pieces every job shares (data, seed, training settings) travel once per worker as the run's
:class:`~taskgrouping.engine.fit.RunContext`. Every job trains through :func:`~taskgrouping.engine.fit.fit`. :func:`run_jobs` runs the jobs

* ``"sequential"``: one after the other in this process;
* ``"processes"``: over local processes (``concurrent.futures`` with the *spawn* start method; each
  worker sets ``torch.set_num_threads(1)``; as with any spawned pool, a script that starts it must
  guard its entry point with ``if __name__ == "__main__":``);
* ``"ray"``: as Ray tasks (optional extra: ``pip install 'taskgrouping[ray]'``; a multi-machine
  cluster needs the checkpoint directories on a shared file system);
* ``"stacked"``: in this process, the jobs of one architecture and epoch count joined into one network
  trained once (:mod:`taskgrouping.engine.candidate_stack`; with ``train.branches`` stacked, one vmapped
  call for all their trunks, where a GPU is launch-bound), each job with its own selection and early stopping
  and the result it would have alone.

A job's outcome does not depend on where it ran: the model is initialised from ``torch.manual_seed
(seed)`` and the trainer reseeds torch at every epoch, so the backends give bit-for-bit the same
losses and weights (with one torch thread per training). Trained weights come back as safetensors
bytes (no pickled tensors, no shared-memory handles), and :func:`assemble_networks` joins trained
networks into one :class:`~taskgrouping.models.branched.BranchedModel` whose branch ``k`` computes
exactly network ``k``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from safetensors.torch import load as load_tensors
from torch import nn

from taskgrouping.engine.checkpoint import Checkpoint
from taskgrouping.engine.fit import RunContext, build_model, fit
from taskgrouping.engine.trainer import resolve_device
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.io import tensor_bytes
from taskgrouping.models.branched import BranchedModel

if TYPE_CHECKING:
    from taskgrouping.engine.job_cache import JobCache

Backend = Literal["sequential", "processes", "ray", "stacked"]
BACKENDS: tuple[str, ...] = ("sequential", "processes", "ray", "stacked")

__all__ = ["Backend", "BACKENDS", "TrainingJob", "JobResult", "build_network", "train_job",
           "run_jobs", "assemble_networks"]


@dataclass(frozen=True)
class TrainingJob:
    """One network to train.

    Attributes:
        tag: unique name (log records carry it as ``network``).
        grouping: the groups the network trains; its tasks may be a subset of the data's tasks (a
            task-subset network scores only its own tasks).
        model_options: backbone options replacing the context's (e.g. a half-size encoder).
        epochs: epoch count replacing ``train.epochs`` (e.g. ESA's early-stopped networks).
        checkpoint_dir: where the trainer writes its per-epoch checkpoint (``None``: none).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        init_from: a checkpoint directory of an earlier, shorter run of the *same* network; when
            ``checkpoint_dir`` holds no checkpoint yet it is copied there and training continues from
            it (ESA's "train the chosen networks fully" without repeating the early epochs).
        continues_from: epochs that belong to that earlier run: they are left out of this job's
            ``history`` and ``train_seconds`` so that nothing is counted twice.
    """

    tag: str
    grouping: Grouping
    model_options: Mapping[str, Any] | None = None
    epochs: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    init_from: str | None = None
    continues_from: int = 0

    @property
    def tasks(self) -> list[str]:
        return list(self.grouping.tasks)


@dataclass
class JobResult:
    """A trained network: per-task validation / test metrics of the selected epoch and its weights.

    ``train_seconds`` and ``history`` cover the epochs this job ran (see
    :attr:`TrainingJob.continues_from`); ``weights`` is the model's state dict as safetensors bytes.
    """

    tag: str
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    train_seconds: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(repr=False)
    weights: bytes = field(repr=False)

    def loss(self, split: Literal["val", "test"] = "val") -> dict[str, float]:
        """Task -> loss on ``split``."""
        return {t: m["loss"] for t, m in getattr(self, split).items()}


def build_network(ctx: RunContext, job: TrainingJob) -> BranchedModel:
    """The freshly initialised model of ``job`` (:func:`~taskgrouping.engine.fit.build_model`)."""
    try:
        return build_model(ctx, job.grouping, job.model_options)
    except ValueError as exc:
        raise ValueError(f"job {job.tag!r}: {exc}") from None


def train_job(ctx: RunContext, job: TrainingJob) -> JobResult:
    """Train one job in this process through :func:`~taskgrouping.engine.fit.fit` and score it on the
    validation and test splits."""
    model = build_network(ctx, job)
    tasks = [ctx.data.task(t) for t in model.task_names]
    config = ctx.train if job.epochs is None else replace(ctx.train, epochs=int(job.epochs))
    resume = job.resume
    if job.init_from is not None:
        if job.checkpoint_dir is None:
            raise ValueError(f"job {job.tag!r}: init_from needs a checkpoint_dir to continue in")
        source, target = Checkpoint(job.init_from), Checkpoint(job.checkpoint_dir)
        if not target.exists:
            if not source.exists:
                raise FileNotFoundError(f"job {job.tag!r}: no checkpoint to continue from in {job.init_from}")
            source.copy_to(target.dir)
        resume = True
    result, val, test = fit(ctx, model, tag=job.tag, tasks=tasks, config=config, checkpoint_dir=job.checkpoint_dir,
                            resume=resume)
    history = [h for h in result.history if h["epoch"] >= job.continues_from]
    weights = tensor_bytes(result.model.state_dict())
    return JobResult(job.tag, val, test, float(sum(h["seconds"] for h in history)), result.best_epoch,
                     result.epochs_run, history, weights)


# -- backends -------------------------------------------------------------------------------

_WORKER_CONTEXT: RunContext | None = None


def _init_worker(ctx: RunContext) -> None:
    global _WORKER_CONTEXT
    torch.set_num_threads(1)
    _WORKER_CONTEXT = ctx


def _worker_train(job: TrainingJob) -> JobResult:
    assert _WORKER_CONTEXT is not None, "worker used before its initialiser ran"
    return train_job(_WORKER_CONTEXT, job)


def _ray_train(ctx: RunContext, job: TrainingJob) -> JobResult:
    torch.set_num_threads(1)
    return train_job(ctx, job)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("backend 'ray' needs the Ray package, which is not installed: "
                         "pip install 'taskgrouping[ray]'") from None
    return ray


def check_backend(backend: str, workers: int | None) -> None:
    """Raise a clear error for an unknown backend or a bad worker count."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:  # refused with the options, before any training
        raise ValueError("'ray' needs the Ray package, which is not installed: pip install 'taskgrouping[ray]'")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer (or null for one per CPU), got {workers!r}")


def run_jobs(ctx: RunContext, jobs: Sequence[TrainingJob], backend: Backend = "sequential",
             workers: int | None = None, cache: JobCache | None = None,
             on_result: Callable[[JobResult, bool], None] | None = None, ray_address: str | None = None,
             cpus_per_job: float = 1.0, gpus_per_job: float = 0.0) -> list[JobResult]:
    """Train every job and return the results in the order of ``jobs``.

    Args:
        backend: ``"sequential"``, ``"processes"``, ``"ray"`` or ``"stacked"`` (see the module docstring).
        workers: processes (or concurrent Ray tasks) at once; ``None`` = ``os.cpu_count()``. For the stacked
            backend, the most networks in one stack (``None``: every network of one shape). Ignored by the
            sequential backend.
        cache: finished jobs found there are not trained again, and every job is stored there as
            soon as it finishes (used only when ``ctx.data_key`` identifies the data).
        on_result: called with ``(result, from_cache)`` as each result becomes available.
        ray_address: a running Ray cluster to connect to (``None``: ``RAY_ADDRESS`` if set, else a
            local Ray started for this fan-out).
        cpus_per_job, gpus_per_job: Ray resources of one job (fractions allowed).

    Raises:
        ValueError: unknown backend, bad ``workers``, duplicate job tags, Ray missing, settings that would
            couple the networks of a stack.
    """
    check_backend(backend, workers)
    if backend == "stacked":
        from taskgrouping.engine.candidate_stack import stack_refusal

        reason = stack_refusal(ctx)
        if reason is not None:
            raise ValueError(f"backend 'stacked' trains the candidate networks as one network: {reason}")
    if backend == "ray" and not gpus_per_job and resolve_device(ctx.train.device).type == "cuda":
        raise ValueError(f"backend 'ray' with gpus_per_job 0 hides the GPU from every job (Ray gives a task only "
                         f"the GPUs it asks for) while train.device {ctx.train.device!r} is CUDA here: set "
                         f"gpus_per_job (e.g. 0.25 for four jobs per GPU) or train.device to 'cpu'")
    jobs = list(jobs)
    tags = [j.tag for j in jobs]
    if len(set(tags)) != len(tags):
        dup = next(t for t in tags if tags.count(t) > 1)
        raise ValueError(f"job tag {dup!r} is used twice; every job needs its own tag")
    from taskgrouping.engine.job_cache import job_key

    cache = cache if cache is not None and ctx.data_key else None
    keys = [job_key(ctx, j) for j in jobs] if cache is not None else [None] * len(jobs)
    results: list[JobResult | None] = [cache.get(k, j.tag) if cache is not None else None
                                       for k, j in zip(keys, jobs)]
    for res in results:
        if res is not None and on_result is not None:
            on_result(res, True)
    todo = [i for i, r in enumerate(results) if r is None]

    def finished(i: int, res: JobResult) -> None:
        if cache is not None:
            cache.put(keys[i], res)
        if on_result is not None:
            on_result(res, False)
        results[i] = res

    for i, res in zip(todo, _train_all(ctx, [jobs[i] for i in todo], backend, workers, ray_address, cpus_per_job,
                                       gpus_per_job)):
        finished(i, res)
    return [r for r in results if r is not None]


def _train_all(ctx: RunContext, jobs: list[TrainingJob], backend: str, workers: int | None, ray_address: str | None,
               cpus: float, gpus: float) -> Iterator[JobResult]:
    """Results of ``jobs`` in order, each yielded as soon as it (and those before it) finished."""
    if not jobs:
        return
    n_workers = min(workers or os.cpu_count() or 1, len(jobs))
    if backend == "sequential":
        for j in jobs:
            yield train_job(ctx, j)
        return
    if backend == "stacked":
        from taskgrouping.engine.candidate_stack import stack_groups, train_stack

        done: dict[int, JobResult] = {}
        ready = 0
        groups = [g[i:i + (workers or len(g))] for g in stack_groups(jobs) for i in range(0, len(g), workers or len(g))]
        for group in sorted(groups):
            group_jobs = [jobs[i] for i in group]
            results = train_stack(ctx, group_jobs) if len(group) > 1 else [train_job(ctx, group_jobs[0])]
            done.update(zip(group, results))
            while ready in done:
                yield done.pop(ready)
                ready += 1
        return
    if backend == "processes":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(ctx,)) as pool:
            yield from pool.map(_worker_train, jobs)
        return
    ray = _import_ray()
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if address:  # an existing cluster: its own resources
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=n_workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(_ray_train)
    ctx_ref = ray.put(ctx)
    for ref in [remote.remote(ctx_ref, j) for j in jobs]:
        yield ray.get(ref)


def trained_model(ctx: RunContext, job: TrainingJob, result: JobResult) -> BranchedModel:
    """Rebuild ``job``'s model and load the weights ``result`` returned."""
    model = build_network(ctx, job)
    model.load_state_dict(load_tensors(result.weights))
    return model


def assemble_networks(networks: Sequence[BranchedModel], serves: Mapping[str, int]) -> BranchedModel:
    """Join independently trained one-branch networks into one model (groups may overlap).

    Branch ``k`` of the result is network ``k``'s stem followed by its branch, with its heads, so its
    predictions equal network ``k``'s exactly; ``serves`` maps each task to the network answering
    for it. The networks may differ in width (half-size single-task networks).
    """
    branches: list[nn.Module] = []
    heads: list[dict[str, nn.Module]] = []
    for k, net in enumerate(networks):
        if len(net.branches) != 1:
            raise ValueError(f"network {k} has {len(net.branches)} branches; assemble_networks joins "
                             "one-branch networks")
        branches.append(nn.Sequential(net.stem, net.branches[0]))
        heads.append({t: net.head(0, t) for t in net.groups[0]})
    return BranchedModel(nn.Identity(), branches, heads, dict(serves))


def checkpoint_path(directory: Path | None, tag: str) -> str | None:
    """``directory / tag`` as a string, or ``None`` when there is no directory."""
    return None if directory is None else str(Path(directory) / tag)
