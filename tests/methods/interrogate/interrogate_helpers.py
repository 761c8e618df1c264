"""Helpers of the InterroGate tests: gated networks over independently initialised backbones, gate
patterns mixing task-specific and shared channels, and output comparisons."""

from __future__ import annotations

import torch
from torch import nn

from taskgrouping.methods.interrogate import GatedNetwork, build_gated_network
from taskgrouping.models.backbones import build_backbone, output_shape
from taskgrouping.models.heads import make_head
from taskgrouping.tasks import Task

torch.set_num_threads(1)

VIT = ("vit", (1, 28, 28), {"patch_size": 7, "dim": 24, "depth": 2, "heads": 2})
TASKS = [Task("left", "binary"), Task("right", "binary")]


def make_gated(backbone: str, shape: tuple, options: dict, tasks: list[Task], seed: int = 0):
    """A gated network whose shared and task streams are independently initialised backbones."""
    torch.manual_seed(seed)
    shared = build_backbone(backbone, shape, **options)
    branches = {t.name: build_backbone(backbone, shape, **options) for t in tasks}
    feat = output_shape(shared, shape)
    heads = {t.name: make_head(t, feat, shape) for t in tasks}
    return build_gated_network(shared, branches, heads), shared, branches, heads


def mixed_gates(net: GatedNetwork, seed: int = 1) -> dict[str, torch.Tensor]:
    """Task 0 fully task-specific, task 1 fully shared, the others a random half; random β."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, point in net.gate_points().items():
        m = torch.rand(point.alpha.shape, generator=g) > 0.5
        m[0], m[1] = True, False
        masks[name] = m
        with torch.no_grad():
            point.beta.copy_(torch.randn(point.beta.shape, generator=g))
    net.set_gates(masks)
    return masks


def warm_norm_statistics(net: nn.Module, shape: tuple) -> None:
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, *shape))
    net.eval()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[t] - b[t]).detach().abs().max()) for t in a)

