"""Backbone registry.

A backbone is an ``nn.Sequential`` whose children are *blocks*: the branched-model builder shares
the first ``shared_blocks`` of them across groups (the stem) and gives every group its own copy of
the rest. Builders take the input shape (without batch) plus keyword options and must be
deterministic given torch's global RNG.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
from torch import nn

from taskgrouping.option_values import check_factory_options
from taskgrouping.registry import import_modules

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
    check_backbone_options(name, options)
    return BACKBONES[name](tuple(input_shape), **options)


def check_backbone_options(name: object, options: object, prefix: str = "") -> None:
    """What can be checked without the input shape: ``name`` is registered, ``options`` is a mapping
    of options the builder accepts, each value of its annotated type (``ValueError`` naming it)."""
    _load_builtin_backbones()
    if not isinstance(name, str) or name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    if not isinstance(options, dict):
        raise ValueError(f"backbone {name!r}: {prefix.rstrip('.') or 'options'} must be a mapping of options, "
                         f"got {options!r}")
    check_factory_options(BACKBONES[name], options, f"backbone {name!r}", prefix)


def positive_ints(backbone: str, option: str, values: Sequence[object]) -> list[int]:
    """``values`` as a list of integers >= 1, or a ``ValueError`` naming the backbone's option."""
    ok = isinstance(values, (list, tuple)) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        raise ValueError(f"backbone {backbone!r}: option {option} must be a list of positive integers, "
                         f"got {values!r}")
    return [int(v) for v in values]


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
    widths = positive_ints("mlp", "widths", widths)
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
        raise ValueError(f"backbone 'small_cnn' expects image inputs (C, H, W), got shape {input_shape}")
    channels = positive_ints("small_cnn", "channels", channels)
    for option, value, low in (("feature_dim", feature_dim, 1), ("maps", maps, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"backbone 'small_cnn': {option} must be >= {low} (an integer), got {value!r}")
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
