"""The modified Xception encoder of Standley et al. (2020) for 256x256 Taskonomy images.

Standley's ``xception_taskonomy_new`` keeps Xception's entry and middle flows (Chollet 2017) and
drops the exit flow:

* stem: 3x3/2 conv -> BN -> ReLU, then 3x3/1 conv -> BN -> ReLU (``sizes[0]``, ``sizes[1]``);
* blocks 1-3 (entry flow): two separable convolutions each and a downsampling by a learned 2x2/2
  convolution (Standley's replacement for Xception's max pool), 1x1/2 conv + BN shortcut;
* blocks 4-11 (middle flow): three separable convolutions, identity shortcut;
* a shared final ReLU -> separable conv to ``out_channels`` (512) -> BN, the representation every
  task decoder reads.

Separable conv = depthwise 3x3 then pointwise 1x1, no bias, no norm in between; each is preceded by
ReLU (except the first one of block 1, which follows the stem's ReLU) and followed by BN. A
256x256 input gives a 512x16x16 feature map. Convolutions use He-normal (fan-out) init, as Standley.

Children (what ``shared_blocks`` counts) follow DMTG's ``first_k_layers``, which indexes Standley's
13-entry ``sizes`` list: child 0 = first stem conv, 1 = second stem conv, 2..12 = blocks 1..11,
13 = the final separable conv. So ``shared_blocks`` = 0 / 3 / 6 / 9 is exactly DMTG's Table 6
sharing of 0 / 3 / 6 / 9 layers (DMTG's Taskonomy default shares 6: the stem and blocks 1-4).

Width. Standley's "half-sized" networks (cost 0.5) use ``sizes`` = :data:`HALF_SIZES` (24, 48,
96, 192, then 512 instead of 728), channels x ~0.7 so that compute, which grows with the square of
the width, roughly halves. ``width`` scales every entry of :data:`FULL_SIZES` and rounds to a
multiple of 8; ``width=2**-0.5`` gives (24, 48, 88, 184, 512 ...), close to Standley's list, and
about half the encoder's FLOPs. ``out_channels`` stays 512 as in Standley, whose half-sized
networks keep the full 512-channel representation and decoders.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from taskgrouping.models.backbones import register_backbone
from taskgrouping.models.resnet import he_init, image_channels, positive_int

FULL_SIZES: tuple[int, ...] = (32, 64, 128, 256) + (728,) * 9
"""Standley's channel list for the full-sized (cost 1) networks: two stem convs, then 11 blocks."""
HALF_SIZES: tuple[int, ...] = (24, 48, 96, 192) + (512,) * 9
"""Standley's channel list for the half-sized (cost 0.5) networks."""


class SeparableConv2d(nn.Module):
    """Depthwise k x k convolution then pointwise 1x1 convolution (Chollet 2017), no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """``reps`` x [ReLU, separable conv, BN] (+ 2x2/2 conv when ``stride=2``) plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int,
                 start_with_relu: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(reps):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU())
            layers += [SeparableConv2d(c, out_channels), nn.BatchNorm2d(out_channels)]
            c = out_channels
        if stride != 1:
            layers.append(nn.Conv2d(out_channels, out_channels, stride, stride=stride))
        self.residual = nn.Sequential(*layers)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


def scaled_sizes(width: float, sizes: Sequence[int] = FULL_SIZES) -> tuple[int, ...]:
    """``sizes`` x ``width``, each rounded to the nearest multiple of 8 (at least 8)."""
    if width == 1.0:
        return tuple(int(s) for s in sizes)
    return tuple(max(8, int(round(s * width / 8)) * 8) for s in sizes)


@register_backbone("xception")
def xception(input_shape: tuple[int, ...], width: float = 1.0, sizes: Sequence[int] | None = None,
             out_channels: int = 512) -> nn.Sequential:
    """Standley's Taskonomy Xception encoder (module docstring); returns a feature map.

    Args:
        input_shape: (C, H, W) with H, W multiples of 16 (Standley: 3x256x256 -> 512x16x16).
        width: channel multiplier on :data:`FULL_SIZES`; ``2**-0.5`` halves the FLOPs.
        sizes: explicit 13 channel counts (e.g. :data:`HALF_SIZES`), scaled by ``width``.
        out_channels: channels of the final separable conv (Standley: 512).
    """
    c = image_channels("xception", input_shape)
    h, w = int(input_shape[1]), int(input_shape[2])
    if h % 16 or w % 16:
        raise ValueError(f"backbone 'xception' downsamples 4 times by 2 and needs H, W multiples of 16; "
                         f"got input shape {tuple(input_shape)}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"backbone 'xception': option width must be a positive number, got {width!r}")
    base = FULL_SIZES if sizes is None else tuple(sizes)
    if len(base) != len(FULL_SIZES) or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in base):
        raise ValueError(f"backbone 'xception': option sizes must be {len(FULL_SIZES)} positive integers "
                         f"(2 stem convs, then 11 blocks), got {sizes!r}")
    out_channels = positive_int("xception", "out_channels", out_channels)
    s = scaled_sizes(float(width), base)

    children: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(c, s[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(s[0]), nn.ReLU()),
        nn.Sequential(nn.Conv2d(s[0], s[1], 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(s[1]), nn.ReLU()),
    ]
    for i in range(2, len(s)):
        entry = i <= 4  # blocks 1-3
        children.append(XceptionBlock(s[i - 1], s[i], reps=2 if entry else 3, stride=2 if entry else 1,
                                      start_with_relu=i > 2))
    children.append(nn.Sequential(nn.ReLU(), SeparableConv2d(s[-1], out_channels), nn.BatchNorm2d(out_channels)))
    return he_init(nn.Sequential(*children))
