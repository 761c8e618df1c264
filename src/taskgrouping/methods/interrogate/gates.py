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

__all__ = ["straight_through_gate", "gate_select", "mix_streams", "gate_streams", "GatePoint"]


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


def gate_select(gate: Tensor, own: Tensor, shared: Tensor, dim: int) -> Tensor:
    """``G ⊙ own + (1 − G) ⊙ shared`` with the per-channel gate broadcast along ``dim``."""
    g = _channel_view(gate, own.ndim, dim).to(own.dtype)
    return g * own + (1 - g) * shared


def mix_streams(streams: Sequence[Tensor], weights: Tensor, dim: int) -> Tensor:
    """``Σ_t weights[:, t] ⊙ streams[t]`` (weights ``C × T``), summed in task order so the gated
    and the compiled networks produce the same bits."""
    out: Tensor | None = None
    for t, s in enumerate(streams):
        term = _channel_view(weights[:, t], s.ndim, dim).to(s.dtype) * s
        out = term if out is None else out + term
    assert out is not None
    return out


def _reduce_to_channels(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Sum of ``x`` over every dimension but the channel one (C,)."""
    dim = dim % x.ndim
    return x.sum(dim=[d for d in range(x.ndim) if d != dim], dtype=dtype)


class _GateStreams(torch.autograd.Function):
    """``φ'_t`` for every task and, optionally, ``ψ'`` in one autograd node.

    The forward values are those of :func:`gate_select` and :func:`mix_streams` (the same operations
    on the same values, so the same bits as the compiled network); the backward pass computes the
    gradients of ψ, every φ_t, α (straight-through) and β directly, in about half the memory passes
    autograd takes over the elementwise graph (these passes, not FLOPs, are the gates' cost).
    """

    @staticmethod
    def forward(ctx, shared: Tensor, alpha: Tensor, beta: Tensor, dim: int, need_mix: bool,
                *own: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        soft = torch.sigmoid(alpha)
        gates = (soft > 0.5).to(shared.dtype)
        weights = torch.softmax(beta, dim=1) if need_mix else None
        views = [_channel_view(gates[t], shared.ndim, dim) for t in range(len(own))]
        out = [torch.addcmul(shared * (1 - g), o, g) for g, o in zip(views, own)]
        mixed = mix_streams(out, weights, dim) if weights is not None else shared.new_zeros(())
        ctx.dim, ctx.need_mix = dim, need_mix
        ctx.save_for_backward(shared, soft, gates, weights if weights is not None else soft.new_zeros(()),
                              *own, *out)
        return (*out, mixed)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        shared, soft, gates, weights, *rest = ctx.saved_tensors
        n = len(rest) // 2
        own, out = rest[:n], rest[n:]
        dim = ctx.dim
        grad_out, grad_mix = grads[:n], (grads[n] if ctx.need_mix else None)
        grad_shared = torch.zeros_like(shared)
        grad_own: list[Tensor | None] = []
        grad_gate = torch.zeros_like(soft)
        grad_weight = torch.zeros_like(weights) if grad_mix is not None else None
        for t in range(n):
            h = grad_out[t]
            if grad_mix is not None:
                w = _channel_view(weights[:, t], shared.ndim, dim).to(shared.dtype)
                h = grad_mix * w if h is None else torch.addcmul(h, grad_mix, w)
                grad_weight[:, t] = _reduce_to_channels(grad_mix * out[t], dim, weights.dtype)
            if h is None:
                grad_own.append(None)
                continue
            g = _channel_view(gates[t], shared.ndim, dim)
            grad_own.append(h * g)
            grad_shared.addcmul_(h, 1 - g)
            grad_gate[t] = _reduce_to_channels((own[t] - shared) * h, dim, soft.dtype)
        grad_alpha = grad_gate * soft * (1 - soft)  # straight-through: dG/dα = σ'(α)
        grad_beta = None
        if grad_weight is not None:  # softmax over tasks, backwards
            grad_beta = weights * (grad_weight - (weights * grad_weight).sum(1, keepdim=True))
        return (grad_shared, grad_alpha, grad_beta, None, None, *grad_own)


def gate_streams(shared: Tensor, own: Sequence[Tensor], alpha: Tensor, beta: Tensor, dim: int,
                 need_mix: bool) -> tuple[list[Tensor], Tensor | None]:
    """Every task's ``φ'_t`` and, when ``need_mix``, ``ψ'``: :func:`gate_select` and :func:`mix_streams`
    with the straight-through gates of ``α``, as one autograd node (same values, same gradients)."""
    *out, mixed = _GateStreams.apply(shared, alpha, beta, dim, need_mix, *own)
    return out, (mixed if need_mix else None)


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

    def select(self, shared: Tensor, own: Sequence[Tensor]) -> list[Tensor]:
        """Every task's ``φ'_t`` from its own output and the shared output."""
        g = self.gates()
        return [gate_select(g[t], o, shared, self.channel_dim) for t, o in enumerate(own)]

    def mix(self, streams: Sequence[Tensor]) -> Tensor:
        """The shared stream's next input ``ψ'``."""
        return mix_streams(streams, self.mix_weights(), self.channel_dim)

    def forward(self, shared: Tensor, own: Sequence[Tensor], need_mix: bool) -> tuple[list[Tensor], Tensor | None]:
        """:meth:`select`, then :meth:`mix` when ``need_mix``, fused (:func:`gate_streams`)."""
        return gate_streams(shared, own, self.alpha, self.beta, self.channel_dim, need_mix)
