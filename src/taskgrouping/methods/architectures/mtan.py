"""MTAN, the Multi-Task Attention Network (Liu, Johns & Davison, CVPR 2019), over our backbones.

MTAN keeps one *shared* network and gives every task a chain of soft attention modules that pick
features out of it. The paper's SegNet version attends inside each block (the mask is computed from
the block's first layer and applied to its last); our backbones are ``nn.Sequential`` chains of
opaque blocks, so the adaptation works on block outputs only. With ``p_b`` the shared output of
block ``b`` and ``a^t_{b-1}`` task t's attended feature of the previous block:

    m^t_b = g^t_b( p_b )                          at the first attended block
    m^t_b = g^t_b( [p_b, f_b(a^t_{b-1})] )        after it (concatenated on the channel axis)
    a^t_b = m^t_b * p_b                           (element-wise; m in (0, 1))       (paper Eq. 1)

* ``g^t_b`` (one per task and block): 1x1 conv -> ReLU -> 1x1 conv -> sigmoid on feature maps,
  linear -> ReLU -> linear -> sigmoid on vectors and (per token) on token sequences; the output has
  ``p_b``'s shape. The paper's batch norms are left out (our backbones' small blocks have none).
* ``f_b`` (one per block, *shared by the tasks*, as in the paper): brings ``a^t_{b-1}`` to
  ``p_b``'s shape - 3x3 conv -> ReLU -> resize (average pooling down, bilinear up) between feature
  maps, global average pool -> linear -> ReLU from a feature map to a vector, linear -> ReLU
  between vectors or token sequences of the same length.

Task t's head reads ``a^t`` of the last block. The first ``model.shared_blocks`` blocks get no
attention (a plain shared stem); 0 by default. If every mask were 1, every task would read the
shared backbone's output, i.e. the network would be naive MTL (the invariant the tests check).
The backbone and heads are built exactly as the run's naive-MTL model (same seed).

Balancers: :meth:`MTANNetwork.shared_parameters` is the backbone plus the shared ``f_b``. The
features handed to feature-level balancers and diagnostics are the shared block outputs that the
attention modules read, one entry per attended block, each taken as a separate graph node (a view)
used only by the attention modules: every path from a task loss to a backbone parameter enters
the backbone through exactly one of them, so a feature-level gradient back-propagated from them
reaches each backbone parameter once. MTAN's paper pairs the network with DWA weighting
(``balancer: {name: dwa}``).

MTAN is *not* a grouping method: every task reads the shared network through its own masks, so
its :class:`~taskgrouping.methods.base.MethodResult` reports one group of all tasks and records the
mean attention per task and block in ``extra``. Backbones: every registered one (``mlp``,
``small_cnn``, ``resnet18``, ``resnet20``, ``tag_resnet``, ``xception``, ``vit``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.device import model_device
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.architectures.blocks import block_output_shapes, channel_axis, sequential_blocks

from taskgrouping.models.branched import BranchedModel, HeadKey

NOT_A_GROUPING = ("MTAN is not a grouping method: every task reads one shared network through its own attention "
                  "masks; the grouping is reported as one group of all tasks")


class _Resize(nn.Module):
    """Feature map to a fixed spatial size: adaptive average pooling down, bilinear up."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)

    def forward(self, z: Tensor) -> Tensor:
        h, w = z.shape[-2:]
        if (h, w) == self.size:
            return z
        if h >= self.size[0] and w >= self.size[1]:
            return F.adaptive_avg_pool2d(z, self.size)
        return F.interpolate(z, size=self.size, mode="bilinear", align_corners=False)


def _kind(shape: Sequence[int], where: str) -> str:
    channel_axis(shape, where)  # validates
    return {1: "vector", 2: "tokens", 3: "map"}[len(shape)]


def attention_module(in_channels: int, shape: Sequence[int], where: str) -> nn.Module:
    """``g``: the mask (values in (0, 1), ``shape``) from ``in_channels`` channels of the same layout."""
    c = shape[channel_axis(shape, where) - 1]
    if _kind(shape, where) == "map":
        return nn.Sequential(nn.Conv2d(in_channels, c, 1), nn.ReLU(), nn.Conv2d(c, c, 1), nn.Sigmoid())
    return nn.Sequential(nn.Linear(in_channels, c), nn.ReLU(), nn.Linear(c, c), nn.Sigmoid())


def shared_transfer(prev: Sequence[int], cur: Sequence[int], where: str) -> nn.Module:
    """``f``: the previous block's attended feature (``prev``) brought to this block's shape ``cur``."""
    a, b = _kind(prev, where), _kind(cur, where)
    if a == "map" and b == "map":
        return nn.Sequential(nn.Conv2d(prev[0], cur[0], 3, padding=1), nn.ReLU(), _Resize((cur[1], cur[2])))
    if a == "map" and b == "vector":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev[0], cur[0]), nn.ReLU())
    if a == "vector" and b == "vector":
        return nn.Sequential(nn.Linear(prev[0], cur[0]), nn.ReLU())
    if a == "tokens" and b == "tokens" and prev[0] == cur[0]:
        return nn.Sequential(nn.Linear(prev[1], cur[1]), nn.ReLU())
    raise ValueError(f"{where}: MTAN cannot carry attention from a block output of shape {tuple(prev)} ({a}) to one "
                     f"of shape {tuple(cur)} ({b}); supported: map->map, map->vector, vector->vector, tokens->tokens "
                     "of the same length")


class MTANNetwork(nn.Module):
    """A shared ``nn.Sequential`` backbone with per-task attention over each block's output.

    Args:
        blocks: the backbone's blocks (shared by every task).
        heads: task name -> head reading the task's attended last-block feature.
        input_shape: shape of one input (to size the attention modules).
        attend_from: index of the first block with attention (earlier blocks form a plain stem).
    """

    def __init__(self, blocks: Sequence[nn.Module], heads: dict[str, nn.Module], input_shape: Sequence[int],
                 attend_from: int = 0) -> None:
        super().__init__()
        blocks = list(blocks)
        if not 0 <= attend_from < len(blocks):
            raise ValueError(f"MTAN: attention starts at block {attend_from} (model.shared_blocks) but the backbone "
                             f"has {len(blocks)} blocks; expected 0 <= shared_blocks < {len(blocks)}")
        self.backbone = nn.Sequential(*blocks)
        self.attend_from = int(attend_from)
        self.task_names = list(heads)
        self.heads = nn.ModuleList(heads.values())
        shapes = block_output_shapes(blocks, input_shape)
        transfers: list[nn.Module] = []
        attention: list[list[nn.Module]] = [[] for _ in self.task_names]
        for b in range(attend_from, len(blocks)):
            where = f"MTAN block {b}"
            c = shapes[b][channel_axis(shapes[b], where) - 1]
            first = b == attend_from
            transfers.append(nn.Identity() if first else shared_transfer(shapes[b - 1], shapes[b], where))
            for t in range(len(self.task_names)):
                attention[t].append(attention_module(c if first else 2 * c, shapes[b], where))
        self.transfers = nn.ModuleList(transfers)
        self.attention = nn.ModuleList(nn.ModuleList(a) for a in attention)
        self._axes = [channel_axis(shapes[b], "") for b in range(attend_from, len(blocks))]

    def _attend(self, x: Tensor, tasks: Sequence[int], masks: dict[int, list[Tensor]] | None = None,
                ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """(task index -> attended last-block feature, block index -> shared-output tap)."""
        z = x
        taps: dict[int, Tensor] = {}
        attended: dict[int, Tensor] = {}
        for b, block in enumerate(self.backbone):
            z = block(z)
            i = b - self.attend_from
            if i < 0:
                continue
            tap = z.view_as(z)  # its own graph node: read by the attention only, not by the next block
            taps[b] = tap
            for t in tasks:
                inp = tap if i == 0 else torch.cat([tap, self.transfers[i](attended[t])], dim=self._axes[i])
                mask = self.attention[t][i](inp)
                if masks is not None:
                    masks.setdefault(t, []).append(mask)
                attended[t] = mask * tap
        return attended, taps

    def all_head_keys(self) -> list[HeadKey]:
        """``(0, task)`` for every task: a task left out of :meth:`forward_heads` costs neither its
        attention modules nor its head (a long table's batch labels a few tasks)."""
        return [(0, t) for t in self.task_names]

    def forward_heads(self, x: Tensor, keys: Sequence[HeadKey] | None = None,
                      ) -> tuple[dict[HeadKey, Tensor], dict[int, Tensor]]:
        """Predictions ``{(0, task): y}`` and the features ``{block: shared output read by the attention}``."""
        want = range(len(self.task_names)) if keys is None else sorted(
            {self.task_names.index(t) for _, t in keys})
        attended, taps = self._attend(x, list(want))
        return {(0, self.task_names[t]): self.heads[t](attended[t]) for t in want}, taps

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        preds, _ = self.forward_heads(x)
        return {t: p for (_, t), p in preds.items()}

    def task_features(self, x: Tensor) -> dict[str, Tensor]:
        """Task name -> attended last-block feature (what the task's head reads)."""
        attended, _ = self._attend(x, range(len(self.task_names)))
        return {self.task_names[t]: f for t, f in attended.items()}

    @torch.no_grad()
    def mean_attention(self, x: Tensor) -> dict[str, list[float]]:
        """Task name -> mean mask value per attended block on ``x`` (eval mode)."""
        was = self.training
        self.eval()
        masks: dict[int, list[Tensor]] = {}
        self._attend(x, range(len(self.task_names)), masks)
        self.train(was)
        return {self.task_names[t]: [float(m.float().mean()) for m in ms] for t, ms in masks.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone and the task-shared transfer layers ``f_b`` (not the attention or heads)."""
        return [p for m in (self.backbone, self.transfers) for p in m.parameters() if p.requires_grad]


def build_mtan(ctx: MethodContext) -> MTANNetwork:
    """MTAN on the run's naive-MTL model (same seed: same backbone and heads), plus fresh attention."""
    names = ctx.data.task_names
    base: BranchedModel = ctx.build_model(Grouping.partition([names]))
    blocks = sequential_blocks(base.stem, "MTAN backbone stem") + sequential_blocks(base.branches[0],
                                                                                    "MTAN backbone")
    heads = {t: base.head(0, t) for t in names}
    return MTANNetwork(blocks, heads, ctx.data.input_shape, attend_from=int(ctx.model.get("shared_blocks", 0)))


@register_method("mtan")
def mtan(ctx: MethodContext) -> MethodResult:
    """MTAN (Liu et al. 2019): shared backbone + per-task attention; not a grouping method."""
    model = build_mtan(ctx)
    result, val, test = ctx.fit(model, "mtan")
    net: MTANNetwork = result.model
    _, _, test_loader = ctx.loaders()
    x, _ = next(iter(test_loader))
    extra = {
        "note": NOT_A_GROUPING,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "attended_blocks": list(range(net.attend_from, len(net.backbone))),
        "mean_attention": net.mean_attention(x.to(model_device(net))),
        "n_parameters": sum(p.numel() for p in net.parameters()),
    }
    grouping = Grouping.partition([ctx.data.task_names], method="mtan", note=NOT_A_GROUPING)
    return MethodResult(grouping, net, test, val, result.train_seconds, n_networks=1, extra=extra)


__all__ = ["MTANNetwork", "build_mtan", "attention_module", "shared_transfer", "mtan"]
