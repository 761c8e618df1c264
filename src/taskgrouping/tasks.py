"""Tasks: what a head predicts, how it is trained and how it is scored.

A :class:`Task` is the single place that knows a task's loss, its metrics and each metric's
direction. Targets follow one convention for every dataset so that masking is uniform:

* classification (``binary``, ``multiclass``, ``segmentation``): ``int64`` class ids, ``-1`` marks a
  missing label (ignored by the loss and the metrics);
* regression (``regression``, ``dense_regression``, ``normal``): floating targets, ``NaN`` marks a
  missing value.

Binary tasks use two logits and cross-entropy, as TAG and DMTG do for CelebA; their ranking metrics
(``auroc``, ``average_precision``) score the softmax probability of class 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TaskKind = Literal["binary", "multiclass", "regression", "segmentation", "dense_regression", "normal"]
TASK_KINDS: tuple[str, ...] = ("binary", "multiclass", "regression", "segmentation", "dense_regression", "normal")
CLASSIFICATION_KINDS = ("binary", "multiclass", "segmentation")
DENSE_KINDS = ("segmentation", "dense_regression", "normal")

#: Direction of every metric name a meter can report (True = higher is better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "loss": False,
    "error": False,
    "accuracy": True,
    "auroc": True,
    "average_precision": True,
    "macro_f1": True,
    "mse": False,
    "l1": False,
    "miou": True,
    "pixel_acc": True,
    "abs_err": False,
    "rel_err": False,
    "mean_angle": False,
    "median_angle": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
}


@dataclass(frozen=True)
class Task:
    """One prediction target.

    Args:
        name: unique task name (the key of the target dict a dataset yields).
        kind: one of :data:`TASK_KINDS`.
        num_classes: classes for classification kinds (binary is always 2).
        out_channels: output dimension for regression kinds (1 for a scalar, 3 for normals).
        loss_type: ``"ce"`` for classification; ``"mse"`` or ``"l1"`` for regression; ``"l1"`` or
            ``"cosine"`` for normals.
        weight: task-loss weight used by methods that weight tasks statically.
    """

    name: str
    kind: TaskKind
    num_classes: int = 2
    out_channels: int = 1
    loss_type: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; expected one of {TASK_KINDS}")
        if self.kind == "binary" and self.num_classes != 2:
            raise ValueError(f"task {self.name!r}: binary tasks have num_classes=2, got {self.num_classes}")
        if self.kind in ("multiclass", "segmentation") and self.num_classes < 2:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 2, got {self.num_classes}")
        default = {"binary": "ce", "multiclass": "ce", "segmentation": "ce", "regression": "mse",
                   "dense_regression": "l1", "normal": "l1"}[self.kind]
        loss_type = self.loss_type or default
        allowed = {"binary": ("ce",), "multiclass": ("ce",), "segmentation": ("ce",),
                   "regression": ("mse", "l1"), "dense_regression": ("l1", "mse"), "normal": ("l1", "cosine")}
        if loss_type not in allowed[self.kind]:
            raise ValueError(f"task {self.name!r}: loss_type {loss_type!r} not allowed for kind {self.kind!r}; "
                             f"expected one of {allowed[self.kind]}")
        object.__setattr__(self, "loss_type", loss_type)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def is_classification(self) -> bool:
        return self.kind in CLASSIFICATION_KINDS

    @property
    def is_dense(self) -> bool:
        return self.kind in DENSE_KINDS

    @property
    def n_outputs(self) -> int:
        """Channels the head must produce."""
        return self.num_classes if self.is_classification else self.out_channels

    @property
    def primary_metric(self) -> str:
        """Metric used for NormGain_E / total error: error rate for classification, else the loss."""
        if self.kind in ("binary", "multiclass"):
            return "error"
        if self.kind == "segmentation":
            return "miou"
        return "loss"

    # -- loss ----------------------------------------------------------------------------------
    def loss_sum_count(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Sum of per-element losses over valid labels and their number (both tensors)."""
        if self.is_classification:
            if self.kind == "segmentation":
                logits, tgt = pred, target.long()
            else:
                logits, tgt = pred.reshape(pred.shape[0], -1), target.reshape(-1).long()
            valid = tgt >= 0
            per = F.cross_entropy(logits.float(), tgt.clamp_min(0), reduction="none")
            return (per * valid).sum(), valid.sum()
        pred = pred.float()
        target = target.to(pred.dtype).reshape(pred.shape)
        if self.kind == "normal" and self.loss_type == "cosine":
            valid = ~torch.isnan(target).any(dim=1)
            t = torch.nan_to_num(target)
            per = 1.0 - F.cosine_similarity(pred, t, dim=1, eps=1e-8)
            return (per * valid).sum(), valid.sum()
        valid = ~torch.isnan(target)
        diff = pred - torch.nan_to_num(target)
        per = diff.abs() if self.loss_type == "l1" else diff.square()
        return torch.where(valid, per, torch.zeros_like(per)).sum(), valid.sum()

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean loss over valid labels; exactly zero (keeping the graph) when none is valid."""
        total, count = self.loss_sum_count(pred, target)
        return total / count.clamp_min(1).to(total.dtype)

    def meter(self) -> "TaskMeter":
        """A fresh accumulator of this task's metrics over a split."""
        return TaskMeter(self)


class TaskMeter:
    """Accumulates a task's loss and metrics over batches (sums, not means of means).

    Binary tasks also keep every valid label's positive-class probability (``float32``) and label
    (``int8``) of the split, for AUROC and average precision; multi-class tasks keep a confusion
    matrix, for macro-F1.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.loss_sum = 0.0
        self.count = 0
        self.correct = 0
        self.n_labels = 0
        self.sq_sum = 0.0
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.confusion: Tensor | None = None
        self.angle_hist = torch.zeros(18001, dtype=torch.float64) if task.kind == "normal" else None
        self.angle_sum = 0.0
        self.n_angles = 0
        self.scores: list[Tensor] = []
        self.labels: list[Tensor] = []

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        task = self.task
        s, c = task.loss_sum_count(pred, target)
        self.loss_sum += float(s)
        self.count += int(c)
        if task.kind in ("binary", "multiclass"):
            tgt = target.reshape(-1).long()
            valid = tgt >= 0
            hit = pred.reshape(pred.shape[0], -1).argmax(dim=1) == tgt
            self.correct += int((hit & valid).sum())
            self.n_labels += int(valid.sum())
            self._update_extra(pred, target)
        elif task.kind == "segmentation":
            k = task.num_classes
            tgt = target.long().reshape(-1)
            lab = pred.argmax(dim=1).reshape(-1)
            valid = tgt >= 0
            idx = tgt[valid] * k + lab[valid]
            conf = torch.bincount(idx, minlength=k * k).reshape(k, k).double()
            self.confusion = conf if self.confusion is None else self.confusion + conf
        elif task.kind == "normal":
            t = target.reshape(pred.shape).float()
            valid = ~torch.isnan(t).any(dim=1)
            cos = F.cosine_similarity(pred.float(), torch.nan_to_num(t), dim=1).clamp(-1, 1)
            ang = torch.rad2deg(torch.acos(cos))[valid].double()
            self.angle_sum += float(ang.sum())
            self.n_angles += int(ang.numel())
            self.angle_hist += torch.bincount((ang * 100).round().long().clamp(0, 18000), minlength=18001).double()
        else:
            t = target.reshape(pred.shape).float()
            valid = ~torch.isnan(t)
            diff = (pred.float() - torch.nan_to_num(t))[valid]
            self.sq_sum += float(diff.square().sum())
            self.abs_sum += float(diff.abs().sum())
            tv = t[valid]
            nz = tv.abs() > 1e-8
            self.rel_sum += float((diff[nz].abs() / tv[nz].abs()).sum())
            self.n_labels += int(valid.sum())

    def _update_extra(self, pred: Tensor, target: Tensor) -> None:
        """Binary: keep scores and labels; multiclass: add to the confusion matrix (valid labels only)."""
        logits = pred.reshape(pred.shape[0], -1).float()
        tgt = target.reshape(-1)
        valid = ~torch.isnan(tgt) & (tgt >= 0) if tgt.is_floating_point() else tgt >= 0
        tgt = tgt[valid].long()
        logits = logits[valid]
        if self.task.kind == "binary":
            prob = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)[:, 1]
            self.scores.append(prob.to(torch.float32))
            self.labels.append(tgt.to(torch.int8))
        else:
            k = self.task.num_classes
            idx = tgt * k + logits.argmax(dim=1)
            conf = torch.bincount(idx, minlength=k * k).reshape(k, k).double()
            self.confusion = conf if self.confusion is None else self.confusion + conf

    def _ranking(self) -> dict[str, float]:
        """AUROC and average precision of a binary task; NaN when the labels seen hold one class or none."""
        if not self.labels:
            return {"auroc": math.nan, "average_precision": math.nan}
        y = torch.cat(self.labels).numpy()
        if y.size == 0 or np.unique(y).size < 2:
            return {"auroc": math.nan, "average_precision": math.nan}
        from sklearn.metrics import average_precision_score, roc_auc_score

        s = torch.cat(self.scores).numpy()
        return {"auroc": float(roc_auc_score(y, s)), "average_precision": float(average_precision_score(y, s))}

    def _macro_f1(self) -> float:
        """Mean F1 over the classes that occur as label or prediction (scikit-learn's ``average="macro"``)."""
        if self.confusion is None:
            return math.nan
        conf = self.confusion
        tp = conf.diag()
        fp = conf.sum(0) - tp
        fn = conf.sum(1) - tp
        present = (tp + fp + fn) > 0
        if not present.any():
            return math.nan
        return float((2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])).mean())

    def compute(self) -> dict[str, float]:
        """Metric name -> value over everything seen (directions in :data:`HIGHER_IS_BETTER`)."""
        task = self.task
        out = {"loss": self.loss_sum / self.count if self.count else math.nan}
        if task.kind in ("binary", "multiclass"):
            acc = self.correct / self.n_labels if self.n_labels else math.nan
            out.update(accuracy=acc, error=1.0 - acc)
            if task.kind == "binary":
                out.update(self._ranking())
            else:
                out["macro_f1"] = self._macro_f1()
        elif task.kind == "segmentation":
            if self.confusion is None:
                out.update(miou=math.nan, pixel_acc=math.nan)
            else:
                conf = self.confusion
                inter = conf.diag()
                union = conf.sum(0) + conf.sum(1) - inter
                present = union > 0
                out["miou"] = float((inter[present] / union[present]).mean()) if present.any() else math.nan
                out["pixel_acc"] = float(inter.sum() / conf.sum()) if conf.sum() > 0 else math.nan
        elif task.kind == "normal":
            n = self.n_angles
            if n == 0:
                out.update({k: math.nan for k in ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30")})
            else:
                cdf = torch.cumsum(self.angle_hist, 0)
                out["mean_angle"] = self.angle_sum / n
                out["median_angle"] = float(torch.searchsorted(cdf, torch.tensor(n / 2.0, dtype=torch.float64))) / 100
                for thr in (11.25, 22.5, 30):
                    out[f"within_{thr:g}"] = float(cdf[int(round(thr * 100))]) / n
        else:
            n = self.n_labels
            out["mse"] = self.sq_sum / n if n else math.nan
            out["l1"] = out["abs_err"] = self.abs_sum / n if n else math.nan
            out["rel_err"] = self.rel_sum / n if n else math.nan
        return out


def validate_task_list(tasks: list[Task]) -> None:
    """Raise if names repeat."""
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise ValueError(f"task name {t.name!r} appears twice")
        seen.add(t.name)


def valid_counts(tasks: Sequence[Task], targets: Mapping[str, Tensor], device: torch.device | None = None) -> Tensor:
    """Valid labels per task in ``targets`` (int64, in the order of ``tasks``; 0 for a task without
    targets), as :meth:`~taskgrouping.tasks.Task.loss_sum_count` counts them: class ids ``>= 0``,
    non-NaN regression values, pixels whose normal has no NaN (cosine loss). On ``device``, by default the
    targets'."""
    if device is None:
        device = next((y.device for y in targets.values()), None)
    counts = []
    for t in tasks:
        y = targets.get(t.name)
        if y is None:
            counts.append(torch.zeros((), dtype=torch.int64, device=device))
        elif t.is_classification:
            counts.append((y >= 0).sum())
        elif t.kind == "normal" and t.loss_type == "cosine":
            counts.append((~torch.isnan(y).any(dim=1)).sum())
        else:
            counts.append((~torch.isnan(y)).sum())
    return torch.stack([c.to(device=device, dtype=torch.int64) for c in counts]) if counts else \
        torch.zeros(0, dtype=torch.int64, device=device)
