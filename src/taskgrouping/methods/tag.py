"""TAG (Fifty et al., NeurIPS 2021), "Efficiently Identifying Task Groupings for Multi-Task Learning",
as an end-to-end method ``tag``.

1. One naive-MTL training (all tasks, one shared encoder) during which, every ``every`` steps and
   before the step's forward pass, :class:`AffinityCollector` measures the lookahead inter-task
   affinity on the step's batch (paper Eq. 3, :func:`taskgrouping.grouping.tag.lookahead_affinity`):
   ``Z[i, j] = 1 - L_j(theta_s - step_i) / L_j(theta_s)``. The shared parameters are restored
   exactly afterwards and the losses are evaluated under a forked RNG, so the training itself is
   bit-for-bit the naive-MTL run (the trained model is kept as the run's naive-MTL model for
   warm starts). Affinities are averaged per epoch and the epoch means summed
   (:class:`~taskgrouping.grouping.tag.AffinityAccumulator`).
2. :func:`taskgrouping.grouping.tag.select_groups` picks at most K groups (overlap allowed; each task
   served by its best group).
3. The chosen groups are trained as one branched model (one branch per group, a task in several
   groups gets a head in each), from scratch or from the naive-MTL weights (``init``).

Options:

* ``every`` (default 1, as TAG on CelebA; TAG used 10 on Taskonomy): measure every k-th step;
* ``lookahead``: ``"sgd"`` (default) takes a plain gradient step with the optimiser's current
  learning rate and ``train.weight_decay``, the paper's Eq. 3 (and TAG's Taskonomy setting);
  ``"optimizer"`` takes the step the training optimiser would take with task i's gradient alone --
  Adam/AdamW with its current moments, SGD with its momentum buffer and weight decay (the
  momentum-aware lookahead of TAG's CelebA setting). The optimiser-aware lookahead needs the
  optimiser's state, which exists after its first step, so step 0 is not measured then. With Adam
  the running moments make up most of the step (a task's own gradient enters with weight
  1 - beta1), so the affinities of different sources differ less than with ``"sgd"``: on a problem
  where one task copies another, ``"sgd"`` finds the pair reliably and ``"optimizer"`` with Adam
  does not;
* ``divide_by_lr`` (default true, as the authors' code): divide affinities by the learning rate
  (only ratios matter for the selection);
* ``solver``: ``"auto"`` / ``"exhaustive"`` / ``"milp"`` for the group selection; ``init``:
  ``"scratch"`` or ``"naive_mtl"`` for the final groups.

Recorded: ``affinity`` (the accumulated matrix in TAG's file form ``{recipient: {source: value}}``),
the lookahead settings, the seconds of the affinity run and of the final training.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.grouping.tag import AffinityAccumulator, lookahead_affinity, select_groups
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.baselines import fit_grouping
from taskgrouping.tasks import Task
from taskgrouping.engine.hooks import CallbackBase, TaskLossObjective

LOOKAHEADS = ("optimizer", "sgd")


class AffinityCollector(CallbackBase):
    """Trainer callback measuring TAG's lookahead affinity before the forward pass of every
    ``every``-th step and accumulating it per epoch.

    The trainer hands it the training optimiser (``on_train_start``); that optimiser's live learning
    rate (schedules included) and state drive the lookahead.
    """

    def __init__(self, tasks: Sequence[Task], shared: Sequence[nn.Parameter], *, every: int = 1,
                 lookahead: str = "sgd", divide_by_lr: bool = True, lr: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"tag.lookahead must be one of {list(LOOKAHEADS)}, got {lookahead!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"tag.every must be a positive integer (measure every k-th step), got {every!r}")
        self.tasks = list(tasks)
        self.names = [t.name for t in self.tasks]
        self.shared = list(shared)
        self.every, self.lookahead, self.divide_by_lr = every, lookahead, bool(divide_by_lr)
        self.lr, self.weight_decay, self.seed = float(lr), float(weight_decay), int(seed)
        self.objective = TaskLossObjective(self.tasks)
        self.accumulator = AffinityAccumulator(self.names)
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch_means: list[list[list[float]] | None] = []
        self.steps = self.skipped = 0
        self._epoch_steps = 0

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def _current_lr(self) -> float:
        if self.optimizer is None:
            return self.lr
        for g in self.optimizer.param_groups:
            if any(p is self.shared[0] for p in g["params"]):
                return float(g["lr"])
        return self.lr

    # -- trainer hooks --------------------------------------------------------------------------
    def on_batch_start(self, step: int, model: nn.Module, batch: tuple[Tensor, dict[str, Tensor]]) -> None:
        if step % self.every:
            return
        x, targets = batch
        if self.lookahead == "optimizer" and self.optimizer is None:
            self.skipped += 1
            return
        if any(not _has_label(t, targets[t.name]) for t in self.tasks):
            self.skipped += 1  # a task without a label in this batch has no loss ratio
            return
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []

        def losses(m: nn.Module, b: Any) -> dict[str, Tensor]:
            with torch.random.fork_rng(devices=devices):  # same dropout noise before and after; RNG untouched
                torch.manual_seed(self.seed + step)
                return self.objective(m, b[0], b[1]).losses

        lr = self._current_lr()
        if self.lookahead == "optimizer":
            mode = "adam_aware" if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)) else "sgd"
            if mode == "sgd" and not isinstance(self.optimizer, torch.optim.SGD):
                raise ValueError(f"tag.lookahead='optimizer' supports Adam, AdamW and SGD, not "
                                 f"{type(self.optimizer).__name__}; use tag.lookahead='sgd'")
            z = lookahead_affinity(model, self.shared, losses, batch, lr, mode=mode, optimizer=self.optimizer,
                                   divide_by_lr=self.divide_by_lr)
        else:
            z = lookahead_affinity(model, self.shared, losses, batch, lr, mode="sgd",
                                   weight_decay=self.weight_decay, divide_by_lr=self.divide_by_lr)
        self.accumulator.update(z)
        self.steps += 1
        self._epoch_steps += 1

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        mean = self.accumulator.end_epoch()
        self.epoch_means.append(None if mean is None else mean.tolist())
        record = {"tag_lookahead_steps": self._epoch_steps}
        if mean is not None:
            record["tag_affinity_epoch_mean"] = _mapping(mean, self.names)
        self._epoch_steps = 0
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_means": self.epoch_means, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the accumulator from the saved epoch means (replaying them gives the same total)."""
        self.accumulator = AffinityAccumulator(self.names)
        self.epoch_means = list(state["epoch_means"])
        for mean in self.epoch_means:
            if mean is not None:
                self.accumulator.update(torch.tensor(mean, dtype=torch.float64))
                self.accumulator.end_epoch()
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])


def _has_label(task: Task, target: Tensor) -> bool:
    if task.is_classification:
        return bool((target >= 0).any())
    return bool((~torch.isnan(target)).any())


def _mapping(matrix: Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``A[source, recipient]`` -> TAG's file form ``{recipient: {source: value}}``."""
    return {r: {s: float(matrix[i, j]) for i, s in enumerate(names)} for j, r in enumerate(names)}


@register_method("tag", {"every": 1, "lookahead": "sgd", "divide_by_lr": True, "solver": "auto",
                         "init": "scratch"})
def tag(ctx: MethodContext) -> MethodResult:
    """Lookahead affinities from one naive-MTL run, at most K (possibly overlapping) groups selected
    on them, the groups trained."""
    names = ctx.data.task_names
    solver = ctx.option("solver", "auto")
    if solver not in ("auto", "exhaustive", "milp"):
        raise ValueError(f"tag.solver must be 'auto', 'exhaustive' or 'milp', got {solver!r}")
    divide = ctx.option("divide_by_lr", True)
    if not isinstance(divide, bool):
        raise ValueError(f"tag.divide_by_lr must be true or false, got {divide!r}")
    init = ctx.option("init", "scratch")
    if init not in ("scratch", "naive_mtl"):
        raise ValueError(f"tag.init must be 'scratch' or 'naive_mtl', got {init!r}")
    model = ctx.build_model(Grouping.partition([names]))
    collector = AffinityCollector(ctx.data.tasks, model.shared_parameters(), every=ctx.option("every", 1),
                                  lookahead=ctx.option("lookahead", "sgd"), divide_by_lr=divide,
                                  lr=ctx.train.lr, weight_decay=ctx.train.weight_decay, seed=ctx.seed)
    run, _, _ = ctx.fit(model, "tag_affinity", score_test=False, callbacks=[collector])
    if collector.accumulator.epochs == 0:
        raise ValueError(f"tag measured no affinity: {collector.skipped} lookahead steps were skipped "
                         f"(tag.every={collector.every}, {run.history[-1]['steps'] if run.history else 0} steps "
                         "per epoch); lower tag.every or train more steps")
    if "naive_mtl_model" not in ctx.cache:  # the affinity run is a naive-MTL run, bit for bit
        ctx.cache.update(naive_mtl_model=run.model, naive_mtl_seconds=run.train_seconds)
    affinity = collector.accumulator.total
    if not bool(torch.isfinite(affinity).all()):
        raise ValueError("tag: the measured affinity contains non-finite values (a loss diverged in the "
                         "lookahead); lower train.lr")
    grouping = select_groups(affinity, names, ctx.K, method=solver)
    final = fit_grouping(ctx, grouping, "tag_groups", init=init)
    extra = dict(final.extra)
    extra.update({
        "affinity": collector.accumulator.to_mapping(),
        "affinity_form": "affinity[recipient][source] = sum over epochs of the mean of "
                         "1 - L_recipient(after source's step) / L_recipient(before)" + (" / lr" if divide else ""),
        "affinity_epochs": collector.accumulator.epochs, "affinity_steps": collector.steps,
        "affinity_skipped_steps": collector.skipped, "lookahead": collector.lookahead, "every": collector.every,
        "divide_by_lr": divide, "affinity_seconds": run.train_seconds, "groups_seconds": final.train_seconds,
        "selection_score": grouping.info.get("score"),
    })
    return MethodResult(final.grouping, final.model, final.per_task, final.val_per_task,
                        run.train_seconds + final.train_seconds, n_networks=1 + len(grouping.groups), extra=extra)
