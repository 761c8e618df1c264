"""Finished trainings kept on disk, so that a killed or extended two-shot run trains each candidate
network only once.

A job's key hashes everything its outcome depends on: the data's fingerprint, the seed, the
training settings (with the job's epoch count), the model and balancer sections (with the job's
backbone options), the diagnostics settings, the groups it trains and which part of a continued
training it covers, and the package version. ``DIR/<key>/`` holds ``result.json`` and
``weights.safetensors``; the folder appears only when both are complete (written into a temporary
sibling, fsynced, then renamed), so an entry is either whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from taskgrouping import __version__
from taskgrouping.engine.fit import RunContext
from taskgrouping.engine.jobs import JobResult, TrainingJob
from taskgrouping.engine.trainer import resolve_device
from taskgrouping.io import atomic_write_bytes, atomic_write_json, fsync_dir

__all__ = ["JobCache", "job_key"]

#: result fields stored in ``result.json`` (the weights go to ``weights.safetensors``)
_FIELDS = ("tag", "val", "test", "train_seconds", "best_epoch", "epochs_run", "history")


#: training settings that do not change a network's outcome (the key ignores them)
OUTCOME_FREE = ("progress", "tensorboard", "loader_workers")


def job_key(run: RunContext, job: TrainingJob) -> str:
    """The hex SHA-256 naming ``job``'s outcome under ``run`` (its tag, paths and :data:`OUTCOME_FREE`
    settings do not count; ``train.device`` counts as the device it resolves to, so that a job trained on
    the CPU is not taken for one trained on a GPU under ``auto``)."""
    train = run.train if job.epochs is None else replace(run.train, epochs=int(job.epochs))
    train = replace(train, device=resolve_device(train.device).type)
    model = dict(run.model)
    if job.model_options is not None:
        model["options"] = dict(job.model_options)
    described = {
        "version": __version__, "data": run.data_key, "seed": run.seed, "model": model,
        "train": {k: v for k, v in asdict(train).items() if k not in OUTCOME_FREE},
        "balancer": dict(run.balancer), "diagnostics": dict(run.diagnostics),
        "groups": job.grouping.as_lists(), "serves": dict(job.grouping.serves),
        "continues_from": job.continues_from,
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class JobCache:
    """Finished jobs under ``directory`` (shared by the runs that point to it)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    def get(self, key: str, tag: str) -> JobResult | None:
        """The stored result of ``key`` (re-tagged ``tag``), or ``None``; an unreadable entry is an error."""
        entry = self.dir / key
        if not entry.is_dir():
            return None
        try:
            fields = json.loads((entry / "result.json").read_text())
            weights = (entry / "weights.safetensors").read_bytes()
            result = JobResult(**{k: fields[k] for k in _FIELDS}, weights=weights)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"job cache entry {entry} is unreadable ({type(exc).__name__}: {exc}); delete it to "
                             "train that network again") from None
        result.tag = tag
        return result

    def put(self, key: str, result: JobResult) -> None:
        """Store ``result`` under ``key``; the entry appears whole or not at all (an existing one is kept)."""
        entry = self.dir / key
        if entry.is_dir():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        atomic_write_json(tmp / "result.json", {k: getattr(result, k) for k in _FIELDS})
        atomic_write_bytes(tmp / "weights.safetensors", result.weights)
        fsync_dir(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same job first
            shutil.rmtree(tmp, ignore_errors=True)
            if not entry.is_dir():
                raise
        fsync_dir(self.dir)
