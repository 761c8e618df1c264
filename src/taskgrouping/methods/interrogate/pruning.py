"""Removing output channels from a layer: what InterroGate's compilation does to every copy of a gated
layer once its gates are fixed (a task keeps the channels with ``G_t = 1``, the shared stream those
some task reads). The weight rows and the following batch norm's entries of the other channels go.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from taskgrouping.models.vit import PatchEmbedding

__all__ = ["prune_weight_layer", "prune_norm", "prune_output_channels"]


def _index(t: Tensor, keep: Tensor, dim: int = 0) -> Tensor:
    return t.detach().index_select(dim, keep.to(t.device)).clone()


def prune_weight_layer(layer: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of ``layer`` (``Conv2d``, ``Linear`` or ``PatchEmbedding``) computing only the output
    channels ``keep``."""
    if isinstance(layer, PatchEmbedding):
        out = copy.deepcopy(layer)
        out.proj = prune_weight_layer(layer.proj, keep)
        out.position = nn.Parameter(_index(layer.position, keep, dim=2))
        return out
    w = layer.weight
    kw = {"device": w.device, "dtype": w.dtype, "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = nn.Conv2d(layer.in_channels, len(keep), layer.kernel_size, stride=layer.stride,
                                   padding=layer.padding, dilation=layer.dilation, groups=1,
                                   padding_mode=layer.padding_mode, **kw)
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, len(keep), **kw)
    else:
        raise TypeError(f"cannot prune output channels of {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(_index(w, keep))
        if layer.bias is not None:
            new.bias.copy_(_index(layer.bias, keep))
    return new


def prune_norm(norm: nn.Module, keep: Tensor) -> nn.Module:
    """A batch norm restricted to the channels ``keep`` (affine parameters and running stats)."""
    new = copy.deepcopy(norm)
    new.num_features = len(keep)
    for name in ("weight", "bias"):
        p = getattr(norm, name)
        if p is not None:
            setattr(new, name, nn.Parameter(_index(p, keep)))
    for name in ("running_mean", "running_var"):
        b = getattr(norm, name)
        if b is not None:
            setattr(new, name, _index(b, keep))
    return new


def prune_output_channels(ops: nn.Sequential, keep: Tensor) -> nn.Sequential:
    """``ops`` = weight layer + channel-local tail, restricted to the output channels ``keep``."""
    out: list[nn.Module] = []
    for i, m in enumerate(ops):
        if i == 0:
            out.append(prune_weight_layer(m, keep))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append(prune_norm(m, keep))
        else:
            out.append(copy.deepcopy(m))
    return nn.Sequential(*out)
