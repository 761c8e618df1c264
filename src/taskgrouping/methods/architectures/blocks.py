"""The blocks of a registered backbone as a chain: their output shapes and channel axes, which the
architectures that wire into a backbone between blocks (Cross-stitch, MTAN) need."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["block_output_shapes", "channel_axis", "sequential_blocks"]


@torch.no_grad()
def block_output_shapes(blocks: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Output shape (without batch) of every block of a sequential chain fed ``input_shape``."""
    modules = list(blocks)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    z = torch.zeros(2, *input_shape)
    shapes = []
    for m in modules:
        z = m(z)
        shapes.append(tuple(z.shape[1:]))
    for m, mode in zip(modules, modes):
        m.train(mode)
    return shapes


def channel_axis(shape: Sequence[int], where: str) -> int:
    """Channel axis of a batched activation whose per-sample shape is ``shape``: 1 for vectors (D,)
    and feature maps (C, H, W), 2 (the last) for token sequences (L, D)."""
    if len(shape) in (1, 3):
        return 1
    if len(shape) == 2:
        return 2
    raise ValueError(f"{where}: activations of shape {tuple(shape)} are neither vectors (D,), token sequences "
                     "(L, D) nor feature maps (C, H, W)")


def sequential_blocks(module: nn.Module, what: str) -> list[nn.Module]:
    """The blocks of an ``nn.Sequential`` stem/branch (none for ``nn.Identity``)."""
    if isinstance(module, nn.Identity):
        return []
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"{what} must be an nn.Sequential of blocks (a registered backbone), got "
                         f"{type(module).__name__}")
    return list(module.children())
