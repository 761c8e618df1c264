"""Cost of a network: FLOPs of one eval-mode forward pass and parameter counts — the one counter
behind Standley's half-size networks (cost 0.5) and InterroGate's accuracy / compute trade-off
(Bejnordi et al., ICML 2024, Fig. 2).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from taskgrouping.device import model_device

__all__ = ["count_flops", "count_parameters"]


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one eval-mode forward pass on one input (``torch.utils.flop_counter``: matrix
    products, convolutions and attention; elementwise work is not counted)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *[int(s) for s in input_shape], device=model_device(model)))
    model.train(was_training)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> int:
    """Parameters of ``model``, except those in ``exclude`` (e.g. the gates)."""
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
