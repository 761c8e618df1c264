"""A run's ``model:`` section checked against its data before anything is written or trained.

:func:`check_model` builds the backbone and the naive-MTL model (every head) on PyTorch's ``meta``
device - shapes only, no memory, no random numbers drawn - for the data's input shape and tasks,
so that a bad backbone option (``widths: [-5]``), too many shared blocks or heads that cannot read
the backbone's output are one ``ValueError`` naming the config key, and a model too large for the
memory is refused before it is allocated.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from taskgrouping.data.base import TaskData
from taskgrouping.data.checks import check_allocation
from taskgrouping.models.backbones import build_backbone, check_backbone_options, default_backbone

__all__ = ["check_model", "BYTES_PER_PARAMETER"]

#: Weights, gradients and two Adam moments in float32.
BYTES_PER_PARAMETER = 16
_BUILD_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError, IndexError, KeyError, NotImplementedError)


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device; if meta tensors are not supported by some layer, for real
    (the global RNG restored either way)."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return build()
        except _BUILD_ERRORS:
            return build()


def check_model(model: Mapping[str, Any], data: TaskData) -> None:
    """Raise ``ValueError`` naming ``model.options`` / ``model.shared_blocks`` / ``model`` when the
    configured model cannot be built for ``data`` or would not fit in memory."""
    from taskgrouping.models.branched import build_branched_model

    shape = tuple(int(s) for s in data.input_shape)
    backbone = model.get("backbone") or default_backbone(shape)
    options = dict(model.get("options") or {})
    shared = model.get("shared_blocks", 0) or 0
    try:
        check_backbone_options(backbone, options, prefix="model.options.")
        net = _on_meta(lambda: build_backbone(backbone, shape, **options))
    except _BUILD_ERRORS as exc:
        text = " ".join(str(exc).split())
        if not text.startswith("backbone"):
            text = f"backbone {backbone!r} with options {options} cannot be built for inputs of shape {shape}: {text}"
        raise ValueError(f"{'model.options' if options else 'model.backbone'}: {text}") from None
    if isinstance(net, nn.Sequential) and shared > len(net):
        raise ValueError(f"model.shared_blocks={shared} but backbone {backbone!r} has {len(net)} blocks; expected at "
                         f"most {len(net)}")
    params = sum(p.numel() for p in net.parameters())
    check_allocation(f"model.options: backbone {backbone!r} with options {options} ({params:,} parameters per "
                     "branch, with gradients and optimiser state)", params * BYTES_PER_PARAMETER)
    try:
        _on_meta(lambda: build_branched_model(data.tasks, [data.task_names], shape, backbone=backbone,
                                              backbone_options=options, shared_blocks=shared))
    except _BUILD_ERRORS as exc:
        raise ValueError(f"model: the heads of dataset {data.name!r} cannot read the output of backbone {backbone!r} "
                         f"with options {options}: {' '.join(str(exc).split())}") from None
