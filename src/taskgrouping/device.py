"""Where a model lives: the device its batches must be moved to."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device"]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; the CPU for a module without either."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
