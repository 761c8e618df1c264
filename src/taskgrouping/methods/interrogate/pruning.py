"""Removing output channels from a layer: what InterroGate's compilation does to every copy of a gated
layer once its gates are fixed (a task keeps the channels with ``G_t = 1``, the shared stream those
some task reads). The weight rows and the following batch norm's entries of the other channels go.

:func:`concat_output_channels` does the opposite for copies that read the same input: one layer whose
output channels are the copies' channels one after another, so that one call computes them all.
:func:`pad_output_channels` appends zero channels (a width the CPU kernels handle faster).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from taskgrouping.models.vit import PatchEmbedding

__all__ = ["prune_weight_layer", "prune_norm", "prune_output_channels", "concat_output_channels",
           "can_concat_output_channels", "pad_output_channels"]


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


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _weight_layer_config(m: nn.Module) -> tuple:
    """Everything but the output width and the tensors that defines a weight layer's computation."""
    if isinstance(m, nn.Conv2d):
        return (nn.Conv2d, m.in_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.padding_mode, m.bias is not None)
    if isinstance(m, nn.Linear):
        return (nn.Linear, m.in_features, m.bias is not None)
    if isinstance(m, PatchEmbedding):
        return (PatchEmbedding, _weight_layer_config(m.proj), tuple(m.position.shape[:2]))
    return (type(m), id(m))  # never equal to another layer's: not concatenable


def _same_module(ms: list[nn.Module]) -> bool:
    """Parameter- and buffer-free modules of one class with the same plain attributes (ReLU, pooling...)."""
    def plain(m: nn.Module) -> dict:
        return {k: v for k, v in vars(m).items() if not k.startswith("_")}
    return (all(type(m) is type(ms[0]) for m in ms) and not any(True for m in ms for _ in m.parameters())
            and not any(True for m in ms for _ in m.buffers()) and all(plain(m) == plain(ms[0]) for m in ms))


def can_concat_output_channels(copies: list[nn.Sequential]) -> bool:
    """Whether :func:`concat_output_channels` can join ``copies``: the same weight layer (but for its output
    width) followed by the same channel-local tail (batch norms with equal settings, parameter-free layers)."""
    if not copies or any(len(c) != len(copies[0]) for c in copies):
        return False
    if not isinstance(copies[0][0], (nn.Conv2d, nn.Linear, PatchEmbedding)):
        return False
    for i, ms in enumerate(zip(*copies)):
        ms = list(ms)
        if i == 0:
            if len({_weight_layer_config(m) for m in ms}) != 1:
                return False
        elif isinstance(ms[0], _NORMS):
            keys = {(type(m), m.eps, m.momentum, m.affine, m.track_running_stats) for m in ms}
            if len(keys) != 1:
                return False
        elif not _same_module(ms):
            return False
    return True


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    return torch.cat([t.detach() for t in tensors], dim).clone()


def _concat_weight_layers(layers: list[nn.Module]) -> nn.Module:
    first = layers[0]
    if isinstance(first, PatchEmbedding):
        out = copy.deepcopy(first)
        out.proj = _concat_weight_layers([m.proj for m in layers])
        out.position = nn.Parameter(_cat([m.position for m in layers], dim=2))
        return out
    w = first.weight
    kw = {"device": w.device, "dtype": w.dtype, "bias": first.bias is not None}
    width = sum(m.weight.shape[0] for m in layers)
    if isinstance(first, nn.Conv2d):
        new: nn.Module = nn.Conv2d(first.in_channels, width, first.kernel_size, stride=first.stride,
                                   padding=first.padding, dilation=first.dilation, groups=first.groups,
                                   padding_mode=first.padding_mode, **kw)
    else:
        new = nn.Linear(first.in_features, width, **kw)
    with torch.no_grad():
        new.weight.copy_(_cat([m.weight for m in layers]))
        if first.bias is not None:
            new.bias.copy_(_cat([m.bias for m in layers]))
    return new


def _concat_norms(norms: list[nn.Module]) -> nn.Module:
    new = copy.deepcopy(norms[0])
    new.num_features = sum(m.num_features for m in norms)
    for name in ("weight", "bias"):
        if getattr(norms[0], name) is not None:
            setattr(new, name, nn.Parameter(_cat([getattr(m, name) for m in norms])))
    for name in ("running_mean", "running_var"):
        if getattr(norms[0], name) is not None:
            setattr(new, name, _cat([getattr(m, name) for m in norms]))
    return new


def concat_output_channels(copies: list[nn.Sequential]) -> nn.Sequential:
    """One ``nn.Sequential`` computing the output channels of every copy in ``copies`` (weight layer +
    channel-local tail, all reading the same input), the first copy's channels first. Each output
    channel is computed as in its copy (up to float rounding: a wider matrix product may sum in another
    order). Check :func:`can_concat_output_channels` first."""
    if not can_concat_output_channels(copies):
        raise ValueError("these layers cannot be joined along their output channels")
    out: list[nn.Module] = []
    for i, ms in enumerate(zip(*copies)):
        ms = list(ms)
        if i == 0:
            out.append(_concat_weight_layers(ms))
        elif isinstance(ms[0], _NORMS):
            out.append(_concat_norms(ms))
        else:
            out.append(copy.deepcopy(ms[0]))
    return nn.Sequential(*out)


def pad_output_channels(ops: nn.Sequential, width: int) -> nn.Sequential:
    """``ops`` (weight layer + channel-local tail, as :func:`prune_output_channels` returns) with zero
    output channels appended up to ``width``: zero weights, bias (and positions), and a batch norm that
    maps them to 0. The first channels keep their values (up to float rounding: a wider matrix product
    may sum in another order); the appended ones are finite and meant to be dropped."""
    first = ops[0]
    current = first.proj.out_channels if isinstance(first, PatchEmbedding) else first.weight.shape[0]
    if width < current:
        raise ValueError(f"cannot pad {current} channels to {width}")
    if width == current:
        return copy.deepcopy(ops)
    zeros = prune_output_channels(ops, torch.zeros(width - current, dtype=torch.long))  # copies of channel 0
    with torch.no_grad():
        for p in zeros[0].parameters():
            p.zero_()
        for m in zeros:
            if isinstance(m, _NORMS):
                for t in (m.weight, m.bias, m.running_mean):
                    if t is not None:
                        t.zero_()
                if m.running_var is not None:
                    m.running_var.fill_(1.0)
    return concat_output_channels([ops, zeros])
