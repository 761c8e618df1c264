"""Standley et al.'s half-size networks (cost 0.5): backbone options whose compute is half the full
network's, so that a budget counts inference cost in units of one full-size network.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import torch

from taskgrouping.flops import count_flops
from taskgrouping.models.backbones import BACKBONES, build_backbone, default_backbone

__all__ = ["HALF_SIZE_BACKBONES", "half_size_options"]


def _scale_mlp(opts: dict[str, Any], s: float) -> dict[str, Any]:
    return dict(opts, widths=[max(1, round(int(w) * s)) for w in opts["widths"]])


def _scale_small_cnn(opts: dict[str, Any], s: float) -> dict[str, Any]:
    return dict(opts, channels=[max(1, round(int(c) * s)) for c in opts["channels"]],
                feature_dim=max(1, round(int(opts["feature_dim"]) * s)))


def _scale_width(opts: dict[str, Any], s: float) -> dict[str, Any]:
    return dict(opts, width=max(1, round(int(opts["width"]) * s)))


#: Backbones whose half-size version is found by scaling these options by one factor.
_SCALED: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], float], dict[str, Any]]]] = {
    "mlp": (("widths",), _scale_mlp),
    "small_cnn": (("channels", "feature_dim"), _scale_small_cnn),
    "resnet18": (("width",), _scale_width),
    "resnet20": (("width",), _scale_width),
    "tag_resnet": (("width",), _scale_width),
}
HALF_SIZE_BACKBONES: tuple[str, ...] = tuple(sorted(set(_SCALED) | {"xception"}))
_HALF_CACHE: dict[tuple, dict[str, Any]] = {}


def _backbone_flops(name: str, options: Mapping[str, Any], input_shape: Sequence[int]) -> int:
    """FLOPs of the backbone alone (heads excluded) on one input; built without touching torch's RNG."""
    with torch.random.fork_rng(devices=[]):
        net = build_backbone(name, input_shape, **options)
    return count_flops(net, input_shape)

def half_size_options(backbone: str | None, options: Mapping[str, Any] | None,
                      input_shape: Sequence[int]) -> dict[str, Any]:
    """Backbone options of Standley's half-size network (cost 0.5): compute halved.

    Per backbone:

    * ``xception``: ``width`` x 2^-1/2, Standley's channel scaling (0.505x the FLOPs at 256x256; see
      :mod:`taskgrouping.models.xception`);
    * ``mlp`` (``widths``), ``small_cnn`` (``channels`` and ``feature_dim``), ``resnet18``,
      ``resnet20``, ``tag_resnet`` (``width``): those options multiplied by one factor ``s`` and
      rounded, with ``s`` chosen so that the backbone's compute on one input of ``input_shape``
      (FLOPs of one forward pass, :func:`taskgrouping.flops.count_flops`; heads excluded) is closest to
      half the full network's. One factor scales all listed options, so the network keeps its shape. For a wide-input
      MLP ``s`` is near 1/2 (the first layer dominates); for convolutional nets near 2^-1/2.

    Raises:
        ValueError: any other backbone (including a module given instead of a name).
    """
    name = backbone if backbone is not None else default_backbone(input_shape)
    opts = dict(options or {})
    key = (name, repr(sorted(opts.items())), tuple(input_shape)) if isinstance(name, str) else None
    if key in _HALF_CACHE:
        return dict(_HALF_CACHE[key])
    if not isinstance(name, str) or name not in HALF_SIZE_BACKBONES:
        shown = name if isinstance(name, str) else type(name).__name__
        raise ValueError(f"half-size networks: backbone {shown!r} has no half-size rule; supported: "
                         f"{list(HALF_SIZE_BACKBONES)}. Set the method's half_size: false to train "
                         "full-size networks only")
    if name == "xception":
        return dict(opts, width=float(opts.get("width", 1.0)) * 2 ** -0.5)
    keys, scale = _SCALED[name]
    full_flops = _backbone_flops(name, opts, input_shape)  # also registers the builtin backbones
    params = inspect.signature(BACKBONES[name]).parameters
    full = dict(opts)
    for k in keys:
        full.setdefault(k, params[k].default)
    grid = np.round(np.arange(0.05, 1.0, 0.005), 3)
    cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def ratio(i: int) -> tuple[float, dict[str, Any]]:
        cand = scale(full, float(grid[i]))
        key = repr(sorted(cand.items()))
        if key not in cache:
            cache[key] = (_backbone_flops(name, cand, input_shape) / full_flops, cand)
        return cache[key]

    lo, hi = 0, len(grid) - 1  # FLOPs grow with s: find the first grid point at or above one half
    while lo < hi:
        mid = (lo + hi) // 2
        if ratio(mid)[0] >= 0.5:
            hi = mid
        else:
            lo = mid + 1
    options_near = [ratio(i) for i in (lo - 1, lo) if 0 <= i < len(grid)]
    _HALF_CACHE[key] = min(options_near, key=lambda rc: abs(rc[0] - 0.5))[1]
    return dict(_HALF_CACHE[key])

