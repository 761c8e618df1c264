"""Task heads: a linear layer on vector features, pooling + linear on feature maps for image-level
tasks, and a small convolutional decoder upsampled to the input size for dense tasks."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.tasks import Task


class DenseHead(nn.Module):
    """3x3 conv + ReLU + 1x1 conv, bilinearly upsampled to ``out_size``."""

    def __init__(self, in_channels: int, out_channels: int, out_size: tuple[int, int], hidden: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(hidden, out_channels, 1))
        self.out_size = tuple(out_size)

    def forward(self, z: Tensor) -> Tensor:
        y = self.conv(z)
        if tuple(y.shape[-2:]) != self.out_size:
            y = F.interpolate(y, size=self.out_size, mode="bilinear", align_corners=False)
        return y


def make_head(task: Task, feature_shape: Sequence[int], input_shape: Sequence[int]) -> nn.Module:
    """The default head for ``task`` on features of ``feature_shape`` (no batch dimension)."""
    feature_shape = tuple(feature_shape)
    if task.is_dense:
        if len(feature_shape) != 3 or len(input_shape) != 3:
            raise ValueError(f"task {task.name!r} is dense ({task.kind}) and needs feature maps (C, H, W) "
                             f"from image inputs; got features {feature_shape} from inputs {tuple(input_shape)}")
        return DenseHead(feature_shape[0], task.n_outputs, (int(input_shape[1]), int(input_shape[2])))
    if len(feature_shape) == 1:
        return nn.Linear(feature_shape[0], task.n_outputs)
    if len(feature_shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feature_shape[0], task.n_outputs))
    if len(feature_shape) == 2:  # tokens (L, D): mean-pool tokens
        return nn.Sequential(_TokenMean(), nn.Linear(feature_shape[1], task.n_outputs))
    raise ValueError(f"task {task.name!r}: no default head for features of shape {feature_shape}")


class _TokenMean(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return z.mean(dim=1)
