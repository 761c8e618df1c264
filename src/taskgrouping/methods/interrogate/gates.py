"""InterroGate's gates (Bejnordi et al., ICML 2024, Sec. 3): per layer, task and channel, a learned
choice between the task's own features and the shared ones, and the β mixture that feeds the
shared stream. With ``φ_t`` task t's output and ``ψ`` the shared stream's output at one layer::

    G_t   = 1[σ(α_t) > 0.5]                      (hard forward; straight-through dG/dα = σ'(α))
    φ'_t  = G_t ⊙ φ_t + (1 − G_t) ⊙ ψ            (what task t's next layer reads)
    ψ'    = Σ_t softmax_t(β)_c ⊙ φ'_t            (what the shared stream's next layer reads)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["straight_through_gate", "gate_select", "Mixture", "mix_streams", "GatePoint"]


def straight_through_gate(alpha: Tensor) -> Tensor:
    """``G = 1[σ(α) > 0.5]`` in the forward pass with gradient ``dG/dα = σ'(α)`` (straight-through
    estimator through the sigmoid). The forward value is exactly 0 or 1."""
    soft = torch.sigmoid(alpha)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


def _channel_view(v: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = v.shape[0]
    return v.reshape(shape)


def _task_channel_view(v: Tensor, stream_ndim: int, dim: int) -> Tensor:
    """``v`` (T × C) as (T, 1, .., C, .., 1): broadcast over T streams stacked along a leading axis, with the
    channels at ``dim`` of a stream."""
    shape = [1] * stream_ndim
    shape[dim] = v.shape[1]
    return v.reshape([v.shape[0]] + shape)


def gate_select(gate: Tensor, own: Tensor, shared: Tensor, dim: int) -> Tensor:
    """``G ⊙ own + (1 − G) ⊙ shared`` with the per-channel gate broadcast along ``dim``, as one
    ``torch.lerp`` (one pass over the activations instead of three; the same gradients). With ``G`` 0 or 1
    the result is ``own`` or ``shared`` exactly, as the compiled network's gathers give it."""
    g = _channel_view(gate, own.ndim, dim).to(own.dtype)
    return torch.lerp(shared, own, g)


class Mixture:
    """Accumulates the shared stream's next input ``ψ' = Σ_t w_t ⊙ φ'_t`` (weights ``C × T``) one task at
    a time (so the compiled network can drop a task's ``φ'_t`` once its turn is over), into one buffer, in
    task order with each product rounded before it is added: the gated network (:func:`mix_streams`) and
    the compiled one sum the same way, to the same bits (a fused multiply-add would round differently)."""

    def __init__(self, weights: Tensor, channel_dim: int) -> None:
        self.weights = weights
        self.channel_dim = channel_dim
        self.out: Tensor | None = None
        self.per_task: Tensor | None = None  # weights as (T, 1, .., C, .., 1), made at the first term

    def add(self, t: int, s: Tensor) -> None:
        if self.per_task is None:
            self.per_task = _task_channel_view(self.weights.t(), s.ndim, self.channel_dim).to(s.dtype)
        w = self.per_task[t]
        self.out = s * w if self.out is None else self.out.add_(s * w)

    def result(self) -> Tensor:
        assert self.out is not None
        return self.out


def mix_streams(streams: Sequence[Tensor], weights: Tensor, dim: int) -> Tensor:
    """``Σ_t weights[:, t] ⊙ streams[t]`` (weights ``C × T``), summed as :class:`Mixture` sums it."""
    mix = Mixture(weights, dim)
    for t, s in enumerate(streams):
        mix.add(t, s)
    return mix.result()


class GatePoint(nn.Module):
    """The gate logits ``α`` (``T × C``) and mixing logits ``β`` (``C × T``) of one gated layer.

    Args:
        n_tasks: T.
        channels: C, the layer's output channels.
        channel_dim: where the channels are in the layer's output (1 for ``(B, C, ...)``, -1 for tokens).
        init: initial value of every ``α`` (positive: start task-specific; ``β`` starts at 0, an
            even mix).
    """

    def __init__(self, n_tasks: int, channels: int, channel_dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n_tasks, channels), float(init)))
        self.beta = nn.Parameter(torch.zeros(channels, n_tasks))
        self.channel_dim = channel_dim

    @property
    def channels(self) -> int:
        return self.alpha.shape[1]

    def gates(self) -> Tensor:
        """Straight-through gates ``G`` (T × C), 0/1 valued."""
        return straight_through_gate(self.alpha)

    def hard_gates(self) -> Tensor:
        """``σ(α) > 0.5`` as a bool tensor (T × C), no graph."""
        return torch.sigmoid(self.alpha.detach()) > 0.5

    def mix_weights(self) -> Tensor:
        """``softmax_t(β)`` (C × T)."""
        return torch.softmax(self.beta, dim=1)

    def select(self, shared: Tensor, own: Sequence[Tensor] | Tensor) -> list[Tensor] | Tensor:
        """Every task's ``φ'_t`` from its own output and the shared output; with the task streams stacked
        along a leading axis (``own``: T × stream shape), as one stacked ``torch.lerp``."""
        g = self.gates()
        if isinstance(own, Tensor):
            gates = _task_channel_view(g, shared.ndim, self.channel_dim)
            return torch.lerp(shared.unsqueeze(0), own, gates.to(own.dtype))
        return [gate_select(g[t], o, shared, self.channel_dim) for t, o in enumerate(own)]

    def mix(self, streams: Sequence[Tensor] | Tensor) -> Tensor:
        """The shared stream's next input ``ψ'``; for stacked streams one product and one sum over the task
        axis (the loop's :class:`Mixture` adds task by task: the two agree to float rounding)."""
        if isinstance(streams, Tensor):
            weights = _task_channel_view(self.mix_weights().t(), streams.ndim - 1, self.channel_dim)
            return (streams * weights.to(streams.dtype)).sum(0)
        return mix_streams(streams, self.mix_weights(), self.channel_dim)
