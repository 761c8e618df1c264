"""Many heads' losses in one vectorised call per kind of scalar task.

DMTG computes up to K*N head losses per step; stacking the targets of same-kind tasks keeps a step's
cost nearly flat in N. The values equal :meth:`Task.loss` to float rounding (the vectorised reductions
sum in another order: up to 2.4e-7 apart for unit-scale losses, measured; not bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taskgrouping.tasks import Task

__all__ = ["StackedTargets"]


def _per_element(key: tuple, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """One kind's per-element losses (0 where the label is missing) and where the labels are valid:
    ``binary`` from logits (rows x 2 x n) and class ids (rows x n, -1 missing), ``regression`` from
    predictions and values of one shape (NaN missing; ``key[1]`` the loss type, l1 or squared)."""
    if key[0] == "binary":
        y = targets.long()
        valid = y >= 0
        per = F.cross_entropy(outputs, y.clamp_min(0), reduction="none")
    else:
        y = targets.to(outputs.dtype)
        valid = ~torch.isnan(y)
        diff = outputs - torch.nan_to_num(y)
        per = diff.abs() if key[1] == "l1" else diff.square()
    return torch.where(valid, per, torch.zeros_like(per)), valid


class StackedTargets:
    """One step's targets, stacked per kind of scalar task so that many heads' losses are computed by
    one vectorised call; other kinds fall back to :meth:`Task.loss`. Values equal ``Task.loss`` to float
    rounding."""

    def __init__(self, tasks: list[Task], targets: dict[str, Tensor]) -> None:
        self.tasks = tasks
        self.targets = targets
        self._cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _kind(task: Task) -> tuple | None:
        if task.kind == "binary":
            return ("binary",)
        if task.kind == "regression" and task.out_channels == 1:
            return ("regression", task.loss_type)
        return None

    def _stack(self, key: tuple, positions: list[int]) -> Tensor:
        ck = (key, tuple(positions))
        if ck not in self._cache:
            cols = [self.targets[self.tasks[i].name].reshape(-1) for i in positions]
            self._cache[ck] = torch.stack(cols, dim=1)
        return self._cache[ck]

    def batched(self, tasks: list[Task]) -> bool:
        """Whether :meth:`branch_losses` takes these tasks (every one of a vectorised kind)."""
        return all(self._kind(t) is not None for t in tasks)

    def branch_losses(self, tasks: list[Task], outputs: Tensor, offsets: list[int], positions: list[int]) -> Tensor:
        """Every branch's losses of ``tasks`` at once (K x len(tasks)) from ``outputs`` (K x B x the heads'
        outputs side by side, task ``j``'s in columns ``offsets[j]:offsets[j + 1]``): one call per kind for
        all K branches, equal to :meth:`losses` per branch to float rounding."""
        out: list[Tensor | None] = [None] * len(tasks)
        buckets: dict[tuple, list[int]] = {}
        for j, t in enumerate(tasks):
            buckets.setdefault(self._kind(t), []).append(j)  # type: ignore[arg-type]
        K, B = outputs.shape[:2]
        for key, js in buckets.items():
            tgt = self._stack(key, [positions[j] for j in js])  # B x n
            cols = [c for j in js for c in range(offsets[j], offsets[j + 1])]
            picked = outputs[..., cols].float()
            if key[0] == "binary":  # (K B) x 2 x n logits against the targets repeated per branch
                per, valid = _per_element(key, picked.reshape(K * B, len(js), 2).transpose(1, 2), tgt.repeat(K, 1))
                per, valid = per.reshape(K, B, len(js)), valid[:B]
            else:
                per, valid = _per_element(key, picked, tgt)
            vals = per.sum(1) / valid.sum(0).clamp_min(1).to(per.dtype)  # K x n
            for n, j in enumerate(js):
                out[j] = vals[:, n]
        return torch.stack(out, dim=1)  # type: ignore[arg-type]

    def losses(self, tasks: list[Task], preds: list[Tensor], positions: list[int]) -> Tensor:
        out: list[Tensor | None] = [None] * len(tasks)
        buckets: dict[tuple, list[int]] = {}
        for j, t in enumerate(tasks):
            key = self._kind(t)
            if key is None:
                out[j] = t.loss(preds[j], self.targets[t.name])
            else:
                buckets.setdefault(key, []).append(j)
        for key, js in buckets.items():
            tgt = self._stack(key, [positions[j] for j in js])
            parts = [preds[j] for j in js]  # binary: B x 2 logits each, stacked to B x 2 x n
            outputs = torch.stack(parts, dim=2) if key[0] == "binary" else torch.cat(parts, dim=1)
            per, valid = _per_element(key, outputs.float(), tgt)
            vals = per.sum(0) / valid.sum(0).clamp_min(1).to(per.dtype)
            for n, j in enumerate(js):
                out[j] = vals[n]
        return torch.stack(out)  # type: ignore[arg-type]
