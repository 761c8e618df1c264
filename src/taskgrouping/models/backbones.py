"""Backbone registry.

A backbone is an ``nn.Sequential`` whose children are *blocks*: the branched-model builder shares
the first ``shared_blocks`` of them across groups (the stem) and gives every group its own copy of
the rest. Builders take the input shape (without batch) plus keyword options and must be
deterministic given torch's global RNG.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from taskgrouping.registry import check_options, import_modules

BackboneBuilder = Callable[..., nn.Sequential]
BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator adding a builder to :data:`BACKBONES` under ``name``."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        BACKBONES[name] = fn
        return fn

    return deco


def build_backbone(name: str, input_shape: Sequence[int], **options) -> nn.Sequential:
    """Build the registered backbone ``name`` for inputs of ``input_shape``."""
    _load_builtin_backbones()
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    fn = BACKBONES[name]
    check_options(fn, options, f"backbone {name!r}")
    return fn(tuple(input_shape), **options)


def default_backbone(input_shape: Sequence[int]) -> str:
    """``mlp`` for vectors, ``small_cnn`` for images (C, H, W)."""
    return "small_cnn" if len(input_shape) == 3 else "mlp"


@torch.no_grad()
def output_shape(module: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape (without batch) of ``module``'s output for one input of ``input_shape``."""
    was_training = module.training
    module.eval()
    out = module(torch.zeros(2, *input_shape))
    module.train(was_training)
    return tuple(out.shape[1:])


@register_backbone("mlp")
def mlp(input_shape: tuple[int, ...], widths: Sequence[int] = (64, 32)) -> nn.Sequential:
    """Fully connected ReLU network; block i = Linear + ReLU (the first also flattens)."""
    blocks: list[nn.Module] = []
    d = 1
    for s in input_shape:
        d *= int(s)
    for i, w in enumerate(widths):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(d, int(w)), nn.ReLU()]
        blocks.append(nn.Sequential(*layers))
        d = int(w)
    return nn.Sequential(*blocks)


@register_backbone("small_cnn")
def small_cnn(input_shape: tuple[int, ...], channels: Sequence[int] = (16, 32),
              feature_dim: int = 64, maps: int = 0) -> nn.Sequential:
    """Strided 3x3 conv blocks, then a flatten + linear block to a ``feature_dim`` vector.

    Flattening (rather than global pooling) keeps *where* a pattern is, which tasks tied to an
    image region (MultiMNIST's left / right digit) need.

    ``maps > 0`` (for dense heads) ends the last block with a linear layer (no activation) from the
    ``feature_dim`` vector to ``maps`` feature maps at the input's resolution, so the output is
    ``(maps, H, W)``; ``maps = 0`` (default) leaves the network unchanged.
    """
    if len(input_shape) != 3:
        raise ValueError(f"small_cnn expects image inputs (C, H, W), got shape {input_shape}")
    if int(maps) < 0:
        raise ValueError(f"backbone 'small_cnn': maps must be >= 0, got {maps!r}")
    blocks: list[nn.Module] = []
    c = input_shape[0]
    for w in channels:
        blocks.append(nn.Sequential(nn.Conv2d(c, int(w), 3, stride=2, padding=1), nn.ReLU()))
        c = int(w)
    trunk = nn.Sequential(*blocks)
    flat = 1
    for s in output_shape(trunk, input_shape):
        flat *= s
    last: list[nn.Module] = [nn.Flatten(), nn.Linear(flat, int(feature_dim)), nn.ReLU()]
    if int(maps) > 0:
        size = (int(maps), int(input_shape[1]), int(input_shape[2]))
        last += [nn.Linear(int(feature_dim), size[0] * size[1] * size[2]), nn.Unflatten(1, size)]
    blocks.append(nn.Sequential(*last))
    return nn.Sequential(*blocks)


def _load_builtin_backbones() -> None:
    """Import the modules that register the papers' backbones (kept out of import time)."""
    import_modules("taskgrouping.models", ("resnet", "tag_resnet", "xception", "vit"))
