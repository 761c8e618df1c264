"""Cross-stitch networks (Misra et al., CVPR 2016): one network per task, with learned linear units
that mix the tasks' same-layer activations.

Architecture (over any registered backbone, i.e. an ``nn.Sequential`` of blocks): the first
``model.shared_blocks`` blocks form a stem shared by all tasks (0 by default); the remaining blocks
are copied once per task (a *column*, built exactly like the single-task networks of
:mod:`taskgrouping.methods.baselines`, from the same seed). After every column block ``b`` a
cross-stitch unit replaces the T activations ``x_1..x_T`` by

    x~_i = sum_j alpha^b_ij x_j                                                   (Misra et al., Eq. 1)

with one ``alpha^b`` (T x T) per block (``granularity: layer``) or one per channel
(``granularity: channel``, the default; the channel is axis 1 of vectors and feature maps and the
last axis of token sequences). Task t's head reads column t's stitched output of the last block.

Initialisation: ``alpha_ii = init_self`` (default 0.9) and ``alpha_ij = (1 - init_self) / (T - 1)``
for ``j != i``, so each row is a convex combination that starts close to the identity, i.e. close
to independent single-task networks (Misra et al. found the (0.9, 0.1) initialisation of their
two-task units to work best). With ``init_self = 1`` the units are the identity and the network
*is* the single-task networks (the invariant the tests check). Misra et al. trained the units with
a larger learning rate than the networks (SGD); here ``stitch_lr_scale`` multiplies the run's
``train.lr`` for the units (default 1, since with Adam a rate of ``train.lr`` already moves alpha
by about ``lr`` per step).

Balancers: every column and unit is read by several tasks once alpha leaves the identity, so
:meth:`CrossStitchNetwork.shared_parameters` is everything but the heads. The features handed to
feature-level balancers and diagnostics are the columns' last-block outputs *before* the last
unit (one entry per column): every path from a task loss to a network parameter passes through
them, and none of them depends on another, so a feature-level gradient back-propagated from them
reaches each parameter exactly once. The last unit then counts as task-specific (like a head).

Cross-stitch is *not* a grouping method: every task keeps its own column, so its
:class:`~taskgrouping.methods.base.MethodResult` reports the trivial grouping "all tasks in one
group" (one network answers for every task) and records the learned units in ``extra``.
Backbones: every registered one (``mlp``, ``small_cnn``, ``resnet18``, ``resnet20``,
``tag_resnet``, ``xception``, ``vit``); the cost is T copies of the non-stem blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.architectures.blocks import block_output_shapes, channel_axis, sequential_blocks
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.options import MethodOptions, expect_choice, expect_number

from taskgrouping.models.branched import BranchedModel, HeadKey
from taskgrouping.tasks import Task
from taskgrouping.engine.hooks import TaskLossObjective

GRANULARITIES = ("channel", "layer")
NOT_A_GROUPING = ("cross-stitch is not a grouping method: every task keeps its own column mixed with the others by "
                  "learned units; the grouping is reported as one group of all tasks")


# -- the unit and the network -------------------------------------------------------------------

def stitch_init(n_tasks: int, init_self: float) -> Tensor:
    """T x T matrix with ``init_self`` on the diagonal and ``(1 - init_self)/(T - 1)`` elsewhere."""
    if n_tasks == 1:
        return torch.ones(1, 1)
    other = (1.0 - init_self) / (n_tasks - 1)
    return torch.full((n_tasks, n_tasks), other) + (init_self - other) * torch.eye(n_tasks)


class CrossStitchUnit(nn.Module):
    """``out_i = sum_j alpha_ij x_j`` over T same-shaped activations (Misra et al., Eq. 1).

    Args:
        n_tasks: T.
        channels: size of the channel axis (used when ``granularity="channel"``).
        axis: channel axis of the batched activations.
        init_self: diagonal of the initial alpha (rows sum to one).
        granularity: ``"channel"`` (alpha is T x T x C) or ``"layer"`` (T x T).
    """

    def __init__(self, n_tasks: int, channels: int, axis: int, init_self: float = 0.9,
                 granularity: str = "channel") -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"cross_stitch.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        base = stitch_init(n_tasks, init_self)
        if granularity == "channel":
            base = base.unsqueeze(-1).repeat(1, 1, int(channels))
        self.alpha = nn.Parameter(base)
        self.axis = int(axis)
        self.granularity = granularity

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        x = torch.stack(list(xs))  # T x B x ...
        if self.granularity == "layer":
            out = torch.einsum("ij,j...->i...", self.alpha.to(x.dtype), x)
        else:
            moved = x.movedim(self.axis + 1, -1)
            out = torch.einsum("ijc,j...c->i...c", self.alpha.to(x.dtype), moved).movedim(-1, self.axis + 1)
        return list(out.unbind(0))

    def mean_alpha(self) -> list[list[float]]:
        """alpha averaged over channels (T x T), for reports."""
        a = self.alpha.detach()
        return (a.mean(dim=-1) if a.ndim == 3 else a).cpu().tolist()


class CrossStitchNetwork(nn.Module):
    """Shared stem, one column of blocks per task, a cross-stitch unit after every column block,
    one head per task (on its own column).

    Args:
        stem: blocks shared by all tasks (``nn.Identity`` for none).
        columns: one ``nn.Sequential`` of blocks per task, all of the same architecture.
        heads: task name -> head, in column order.
        input_shape: shape of one input (to size the units).
        init_self, granularity: see :class:`CrossStitchUnit`.
    """

    def __init__(self, stem: nn.Module, columns: Sequence[nn.Module], heads: dict[str, nn.Module],
                 input_shape: Sequence[int], init_self: float = 0.9, granularity: str = "channel") -> None:
        super().__init__()
        if len(columns) != len(heads) or not columns:
            raise ValueError(f"cross-stitch needs one column per task; got {len(columns)} columns and "
                             f"{len(heads)} heads")
        blocks = [sequential_blocks(c, f"cross-stitch column {k}") for k, c in enumerate(columns)]
        if any(len(b) != len(blocks[0]) for b in blocks) or not blocks[0]:
            raise ValueError("cross-stitch columns must all have the same (non-zero) number of blocks; got "
                             f"{[len(b) for b in blocks]}")
        self.stem = stem
        self.columns = nn.ModuleList(nn.ModuleList(b) for b in blocks)
        self.task_names = list(heads)
        self.heads = nn.ModuleList(heads.values())
        stem_shape = block_output_shapes([stem], input_shape)[0]
        shapes = block_output_shapes(blocks[0], stem_shape)
        units = []
        for b, shape in enumerate(shapes):
            axis = channel_axis(shape, f"cross-stitch block {b}")
            units.append(CrossStitchUnit(len(columns), shape[axis - 1], axis, init_self, granularity))
        self.stitches = nn.ModuleList(units)

    @property
    def serves(self) -> dict[str, int]:
        return {t: k for k, t in enumerate(self.task_names)}

    def column_features(self, x: Tensor) -> list[Tensor]:
        """Every column's last-block output before the last cross-stitch unit."""
        z = self.stem(x)
        xs = [z] * len(self.task_names)
        last = len(self.stitches) - 1
        for b, unit in enumerate(self.stitches):
            xs = [col[b](h) for col, h in zip(self.columns, xs)]
            if b < last:
                xs = unit(xs)
        return xs

    def all_head_keys(self) -> list[HeadKey]:
        """``(column, task)`` for every task. A task left out of :meth:`forward_heads` costs no head; its
        column still runs, because the units mix it into the other tasks' columns."""
        return list(enumerate(self.task_names))

    def forward_heads(self, x: Tensor, keys: Sequence[HeadKey] | None = None,
                      ) -> tuple[dict[HeadKey, Tensor], dict[int, Tensor]]:
        """Predictions ``{(column, task): y}`` and the features ``{column: pre-stitch output}``."""
        feats = self.column_features(x)
        mixed = self.stitches[-1](feats)
        want = range(len(self.task_names)) if keys is None else sorted({k for k, _ in keys})
        preds = {(k, self.task_names[k]): self.heads[k](mixed[k]) for k in want}
        return preds, dict(enumerate(feats))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        preds, _ = self.forward_heads(x)
        return {t: p for (_, t), p in preds.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Stem, columns and units: every parameter but the heads (columns mix through the units)."""
        return [p for m in (self.stem, self.columns, self.stitches) for p in m.parameters() if p.requires_grad]

    def stitch_parameters(self) -> list[nn.Parameter]:
        return [u.alpha for u in self.stitches]

    @torch.no_grad()
    def set_identity(self) -> None:
        """Set every unit to the identity (the columns become independent single-task networks)."""
        for u in self.stitches:
            eye = torch.eye(len(self.task_names), device=u.alpha.device, dtype=u.alpha.dtype)
            u.alpha.copy_(eye.unsqueeze(-1).expand_as(u.alpha) if u.alpha.ndim == 3 else eye)


def build_cross_stitch(ctx: MethodContext, init_self: float = 0.9, granularity: str = "channel") -> CrossStitchNetwork:
    """A cross-stitch network whose stem, columns and heads are the run's single-task model (same
    seed, so the same initial weights as ``single_task``), plus fresh units."""
    names = ctx.data.task_names
    stl: BranchedModel = ctx.build_model(Grouping.partition([[t] for t in names]))
    heads = {t: stl.head(stl.serves[t], t) for t in names}
    return CrossStitchNetwork(stl.stem, [stl.branches[stl.serves[t]] for t in names], heads, ctx.data.input_shape,
                              init_self=init_self, granularity=granularity)


class CrossStitchObjective(TaskLossObjective):
    """Task losses as usual; the units get ``stitch_lr_scale`` times the run's learning rate."""

    def __init__(self, tasks: Sequence[Task], lr: float, stitch_lr_scale: float) -> None:
        super().__init__(tasks)
        self.stitch_lr = float(lr) * float(stitch_lr_scale)

    def param_groups(self, model: CrossStitchNetwork) -> list[dict[str, Any]]:
        stitch = {id(p) for p in model.stitch_parameters()}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in stitch]
        units = [p for p in model.stitch_parameters() if p.requires_grad]
        return [{"params": rest}] + ([{"params": units, "lr": self.stitch_lr}] if units else [])


@dataclass(frozen=True)
class CrossStitchOptions(MethodOptions):
    """``init_self``: the units' initial diagonal; ``granularity``: one alpha per ``channel`` or per
    ``layer``; ``stitch_lr_scale``: the units' learning rate over ``train.lr``."""

    init_self: float = 0.9
    granularity: str = "channel"
    stitch_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        expect_number("init_self", self.init_self, low=0, high=1)
        expect_choice("granularity", self.granularity, GRANULARITIES)
        expect_number("stitch_lr_scale", self.stitch_lr_scale, low=0, low_open=True)


@register_method("cross_stitch", CrossStitchOptions)
def cross_stitch(ctx: MethodContext) -> MethodResult:
    """Cross-stitch network (Misra et al. 2016); not a grouping method: reports one group of all tasks."""
    o = ctx.opts(CrossStitchOptions)
    opts = {"init_self": float(o.init_self), "granularity": o.granularity, "stitch_lr_scale": float(o.stitch_lr_scale)}
    model = build_cross_stitch(ctx, opts["init_self"], opts["granularity"])
    objective = CrossStitchObjective(ctx.data.tasks, ctx.train.lr, opts["stitch_lr_scale"])
    result, val, test = ctx.fit(model, "cross_stitch", objective=objective)
    net: CrossStitchNetwork = result.model
    extra = {
        "note": NOT_A_GROUPING,
        "options": opts,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stitch_alpha": [u.mean_alpha() for u in net.stitches],
        "n_parameters": sum(p.numel() for p in net.parameters()),
    }
    grouping = Grouping.partition([ctx.data.task_names], method="cross_stitch", note=NOT_A_GROUPING)
    return MethodResult(grouping, net, test, val, result.train_seconds, n_networks=1, extra=extra)


__all__ = ["CrossStitchOptions", "CrossStitchUnit", "CrossStitchNetwork", "CrossStitchObjective",
           "build_cross_stitch", "stitch_init", "cross_stitch"]
