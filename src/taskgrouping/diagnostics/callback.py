"""Logging the diagnostics during training without changing the run.

The trainer calls :class:`DiagnosticsCallback` after the forward pass and *before* the step's
backward pass, while the graph still exists (``train(..., callbacks=[DiagnosticsCallback(every=10)])``).
Gradients come from :func:`torch.autograd.grad`, which returns them instead of accumulating them,
so ``.grad``, the optimiser, the RNG and the training trajectory are unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from taskgrouping.diagnostics.measures import (MEASURES, FeatureArg, Level, Scratch, check_measures,
                                               measure_batch)
from taskgrouping.diagnostics.plots import plot_trajectories
from taskgrouping.engine.hooks import CallbackBase


class DiagnosticsCallback(CallbackBase):
    """Logs GDS / GMS / FD every ``every`` steps during training, without changing the run.

    Follows the trainer's callback protocol (:func:`taskgrouping.engine.trainer.train`): the trainer calls
    ``on_step(step, output, model, batch)`` after the forward pass and *before* the step's backward
    pass, while the graph still exists. The losses are ``output.losses``, the shared parameters
    ``model.shared_parameters()`` (needed at ``level="param"`` for GDS/GMS) and the features the
    heads read ``output.features`` (needed for FD and at ``level="feature"``). Gradients come from
    :func:`torch.autograd.grad` with ``retain_graph=True, create_graph=False``, so ``.grad``, the
    optimiser, the RNG and the training trajectory are unchanged. Cost per measurement: one
    backward pass per task through the shared trunk at ``level="param"``; one pass through the
    heads at ``level="feature"`` (one per task when the tasks' heads share graph nodes). The
    callback keeps its two work buffers (T x P and T x N floats) between measurements when each is
    at most 64 MiB.

    ``on_epoch_end(epoch)`` tags the entries logged during the epoch with ``"epoch"`` and returns
    ``{"diagnostics": {...}}`` (merged by the trainer into the epoch's log record): the latest
    entry and the mean of each measure over the epoch's entries.

    Attributes:
        history: one dict per measured step, ``{"step": int, <measure>: float, ...}`` with the
            requested measures (NaN where undefined, e.g. all task gradients zero), plus
            ``"epoch"`` once that epoch has ended.
    """

    def __init__(self, every: int = 10, level: Level = "param", measures: Sequence[str] = MEASURES) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (steps between measurements), got {every!r}")
        if level not in ("param", "feature"):
            raise ValueError(f"level must be 'param' or 'feature', got {level!r}")
        self.every = every
        self.level: Level = level
        self.measures = check_measures(measures)
        self.history: list[dict[str, Any]] = []
        self._epoch_start = 0  # index of the first history entry of the running epoch
        self._scratch = Scratch()

    @property
    def needs_shared_parameters(self) -> bool:
        """True when the model must provide ``shared_parameters()`` (GDS/GMS at the param level)."""
        return self.level == "param" and ("gds" in self.measures or "gms" in self.measures)

    @property
    def needs_features(self) -> bool:
        """True when the step output must carry the shared features (FD, or the feature level)."""
        return "fd" in self.measures or self.level == "feature"

    def measure(self, step: int, losses: Mapping[str, Tensor], shared_params: Sequence[Tensor] | None = None,
                features: FeatureArg = None) -> dict[str, Any] | None:
        """Measure at steps divisible by ``every`` from explicit tensors; return the new history
        entry, else None. (:meth:`on_step` is this with the tensors taken from the trainer.)"""
        if step % self.every:
            return None
        entry: dict[str, Any] = {"step": int(step)}
        entry.update(measure_batch(losses, shared_params, features, self.level, self.measures, self._scratch))
        self.history.append(entry)
        return entry

    def on_step(self, step: int, output: Any, model: Any, batch: Any = None) -> dict[str, Any] | None:
        """Trainer hook: measure on ``output.losses`` / ``output.features`` and the model's shared
        parameters at steps divisible by ``every``; return the new history entry, else None."""
        if step % self.every:
            return None
        losses = getattr(output, "losses", None)
        if not isinstance(losses, Mapping):
            raise ValueError(f"DiagnosticsCallback.on_step expects the trainer's StepOutput (with a .losses dict), "
                             f"got {type(output).__name__}")
        shared = None
        if self.needs_shared_parameters:
            if not hasattr(model, "shared_parameters"):
                raise ValueError(f"DiagnosticsCallback(level='param') needs the model's shared parameters for GDS/GMS, "
                                 f"but {type(model).__name__} has no shared_parameters(); use level='feature' or a "
                                 "model that defines it (e.g. BranchedModel)")
            shared = list(model.shared_parameters())
        feats = list((getattr(output, "features", None) or {}).values()) or None
        if self.needs_features and feats is None:
            raise ValueError(f"DiagnosticsCallback (level={self.level!r}, measures {list(self.measures)}) needs the "
                             f"shared features the heads read, but the step output of {type(model).__name__} has none; "
                             "use a model with forward_heads() (e.g. BranchedModel) or measure only GDS/GMS at "
                             "level='param'")
        return self.measure(step, losses, shared, feats)

    def epoch_means(self, epoch: int | None = None) -> dict[str, float]:
        """Mean of each measure over the entries logged during ``epoch`` (NaN entries left out).

        Default: the last ended epoch that has entries (``{}`` if none). Measures with no finite
        value in that epoch are NaN.
        """
        tagged = [h for h in self.history if "epoch" in h]
        if epoch is None:
            if not tagged:
                return {}
            epoch = tagged[-1]["epoch"]
        entries = [h for h in tagged if h["epoch"] == epoch]
        if not entries:
            return {}
        out: dict[str, float] = {}
        for m in self.measures:
            vals = [h[m] for h in entries if m in h and not math.isnan(h[m])]
            out[m] = float(sum(vals) / len(vals)) if vals else math.nan
        return out

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        """Trainer hook: tag this epoch's entries and return ``{"diagnostics": {"epoch", "n_measured",
        "last", "epoch_mean"}}`` (``last`` is the latest entry so far, ``None`` before any)."""
        for h in self.history[self._epoch_start:]:
            h["epoch"] = int(epoch)
        n = len(self.history) - self._epoch_start
        self._epoch_start = len(self.history)
        means = self.epoch_means(epoch) if n else {}
        return {"diagnostics": {
            "epoch": int(epoch), "n_measured": n,
            "last": dict(self.history[-1]) if self.history else None,
            "epoch_mean": {m: (None if math.isnan(v) else v) for m, v in means.items()} if n else None,
        }}

    def plot(self, path: str | Path, name: str = "run") -> Path:
        """Write this run's trajectories (one panel per measure) to ``path``."""
        return plot_trajectories({name: self.history}, path, measures=self.measures)

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "level": self.level, "measures": list(self.measures),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history of a run with the same level and measures (resume)."""
        for key in ("level", "measures", "history"):
            if key not in state:
                raise ValueError(f"diagnostics state lacks key {key!r}; expected every, level, measures, history")
        if state["level"] != self.level:
            raise ValueError(f"diagnostics state has level {state['level']!r} but this callback uses {self.level!r}")
        if tuple(state["measures"]) != self.measures:
            raise ValueError(f"diagnostics state has measures {list(state['measures'])} but this callback "
                             f"uses {list(self.measures)}")
        history = []
        for i, h in enumerate(state["history"]):
            if "step" not in h:
                raise ValueError(f"diagnostics state history[{i}] has no 'step'")
            history.append(dict(h))
        self.history = history
        # Entries of ended epochs carry "epoch"; the rest belong to the running epoch.
        self._epoch_start = next((i for i, h in enumerate(history) if "epoch" not in h), len(history))


__all__ = ["DiagnosticsCallback"]
