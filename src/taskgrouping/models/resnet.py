"""Residual networks: ImageNet-style ResNet-18 and the CIFAR ResNet-20 of He et al. (2016).

Both return the last feature map (C, H, W) without pooling or classifier; the default heads pool it.

Block granularity (what ``shared_blocks`` counts): child 0 is the stem, then every *residual
block* is its own child, so groups can branch after any residual block and not only between
stages. Stage boundaries fall at ``shared_blocks`` = 1, 3, 5, 7, 9 for ``resnet18`` (stem, then
2 blocks per stage) and 1, 4, 7, 10 for ``resnet20`` (stem, then 3 blocks per stage).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.models.backbones import register_backbone

NormFactory = Callable[[int], nn.Module]


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut, He et al. (2016) option A: subsample by ``stride`` and append
    zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"zero-padding shortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)) (He et al. 2016, Fig. 2 left).

    The shortcut is the identity when the shape is kept; otherwise a 1x1 strided convolution +
    norm (``shortcut="B"``, torchvision's ResNet-18) or zero padding (``shortcut="A"``, the paper's
    CIFAR networks).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B",
                 norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          norm(out_channels))
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            raise ValueError(f"shortcut must be 'A' (zero padding) or 'B' (1x1 projection), got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def image_channels(backbone: str, input_shape: Sequence[int]) -> int:
    """Channels of an image input shape (C, H, W); a clear error for anything else."""
    if len(input_shape) != 3 or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"backbone {backbone!r} expects image inputs (C, H, W) with positive sizes, "
                         f"got shape {tuple(input_shape)}")
    return int(input_shape[0])


def positive_int(backbone: str, option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"backbone {backbone!r}: option {option} must be a positive integer, got {value!r}")
    return value


def he_init(net: nn.Module) -> nn.Module:
    """He et al. (2015) normal init of convolutions (fan-out, ReLU gain); norms at weight 1, bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def residual_stages(in_channels: int, widths: Sequence[int], blocks_per_stage: int, shortcut: str,
                    ) -> list[nn.Module]:
    """Residual blocks of consecutive stages; every stage after the first halves the resolution."""
    blocks: list[nn.Module] = []
    c = in_channels
    for s, w in enumerate(widths):
        for b in range(blocks_per_stage):
            stride = 2 if s > 0 and b == 0 else 1
            blocks.append(BasicBlock(c, w, stride, shortcut))
            c = w
    return blocks


@register_backbone("resnet18")
def resnet18(input_shape: tuple[int, ...], width: int = 64, small_input: bool = False) -> nn.Sequential:
    """ResNet-18 (He et al. 2016, Table 1) without average pool and fc: 4 stages x 2 basic blocks of
    ``width``, 2, 4, 8 x ``width`` channels, projection shortcuts when the shape changes.

    ``small_input=False``: ImageNet stem, 7x7/2 conv + 3x3/2 max pool (total stride 32; 3x64x64 ->
    512x2x2). ``small_input=True``: CIFAR-style 3x3/1 conv stem without max pool (total stride 8;
    3x32x32 -> 512x4x4). Children: stem, then the 8 residual blocks (9 children).
    """
    c = image_channels("resnet18", input_shape)
    width = positive_int("resnet18", "width", width)
    if small_input:
        stem = nn.Sequential(nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width),
                             nn.ReLU())
    else:
        stem = nn.Sequential(nn.Conv2d(c, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                             nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
    blocks = residual_stages(width, [width, 2 * width, 4 * width, 8 * width], 2, shortcut="B")
    return he_init(nn.Sequential(stem, *blocks))


@register_backbone("resnet20")
def resnet20(input_shape: tuple[int, ...], width: int = 16, shortcut: str = "A") -> nn.Sequential:
    """The CIFAR ResNet-20 of He et al. (2016, Sec. 4.2, n = 3): a 3x3 conv stem of ``width``
    channels, then 3 stages x 3 basic blocks of ``width``, 2, 4 x ``width`` channels (16/32/64),
    stride 2 at the start of stages 2 and 3 (3x32x32 -> 64x8x8). Shortcuts are option A (identity /
    zero padding, as in the paper's CIFAR experiments) unless ``shortcut="B"``. Children: stem, then
    the 9 residual blocks (10 children).
    """
    c = image_channels("resnet20", input_shape)
    width = positive_int("resnet20", "width", width)
    if shortcut not in ("A", "B"):
        raise ValueError(f"backbone 'resnet20': shortcut must be 'A' (zero padding) or 'B' (1x1 projection), "
                         f"got {shortcut!r}")
    stem = nn.Sequential(nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    blocks = residual_stages(width, [width, 2 * width, 4 * width], 3, shortcut=shortcut)
    return he_init(nn.Sequential(stem, *blocks))
