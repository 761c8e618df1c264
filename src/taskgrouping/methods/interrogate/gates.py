"""InterroGate's gates (Bejnordi et al., ICML 2024, Sec. 3): per layer, task and channel, a learned
choice between the task's own features and the shared ones, and the β mixture that feeds the
shared stream. With ``φ_t`` task t's output and ``ψ`` the shared stream's output at one layer::

    G_t   = 1[σ(α_t) > 0.5]                      (hard forward; straight-through dG/dα = σ'(α))
    φ'_t  = G_t ⊙ φ_t + (1 − G_t) ⊙ ψ            (what task t's next layer reads)
    ψ'    = Σ_t softmax_t(β)_c ⊙ φ'_t            (what the shared stream's next layer reads)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["straight_through_gate", "gate_select", "Mixture", "mix_streams", "select_and_mix", "GatePoint"]


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
    task order, the first product written and each further one added by ``addcmul_`` (one pass): the gated
    network (:func:`mix_streams`) and the compiled one sum the same way, to the same bits."""

    def __init__(self, weights: Tensor, channel_dim: int) -> None:
        self.weights = weights
        self.channel_dim = channel_dim
        self.out: Tensor | None = None
        self.per_task: Tensor | None = None  # weights as (T, 1, .., C, .., 1), made at the first term

    def add(self, t: int, s: Tensor) -> None:
        if self.per_task is None:
            self.per_task = _task_channel_view(self.weights.t(), s.ndim, self.channel_dim).to(s.dtype)
        w = self.per_task[t]
        self.out = s * w if self.out is None else self.out.addcmul_(s, w)

    def result(self) -> Tensor:
        assert self.out is not None
        return self.out


def mix_streams(streams: Sequence[Tensor], weights: Tensor, dim: int) -> Tensor:
    """``Σ_t weights[:, t] ⊙ streams[t]`` (weights ``C × T``), summed as :class:`Mixture` sums it."""
    mix = Mixture(weights, dim)
    for t, s in enumerate(streams):
        mix.add(t, s)
    return mix.result()


def _channel_dot(x: Tensor, y: Tensor, dim: int) -> Tensor:
    """``Σ x ⊙ y`` over every dimension but the channels' (``dim``): shape (C,). With positions after the
    channel (``(B, C, H, W)``), as one batched matrix product of the rows of contiguous positions (a dot
    product each, no product tensor written out)."""
    dim = dim % x.ndim
    after = x.shape[dim + 1:].numel()
    if after == 1 or not (x.is_contiguous() and y.is_contiguous()):
        return (x * y).sum([d for d in range(x.ndim) if d != dim])
    rows = x.shape[:dim + 1].numel()
    dots = torch.bmm(x.reshape(rows, 1, after), y.reshape(rows, after, 1))
    return dots.reshape(-1, x.shape[dim]).sum(0)


class _SelectMix(torch.autograd.Function):
    """Every task's ``φ'_t`` and (with ``need_mix``) their β mixture ``ψ'`` in one autograd node, for
    streams held one tensor per task. The same values as :func:`gate_select` and :func:`mix_streams`
    (bit for bit: ``G`` is 0 or 1 in the forward pass, so ``φ'_t`` is a copy of ``φ_t`` or ``ψ`` channel by
    channel, and the mixture sums as :class:`Mixture`) and the same gradients, in fewer passes over the
    activations: a task whose gates are all 1 (all 0) passes ``φ_t`` (``ψ``) on without a copy and takes its
    gradient back unmasked, and the gradient a task's ``φ'_t`` gets from the mixture is added once, where
    autograd through ``lerp`` and the products would mask, multiply and accumulate it separately. Where no
    task reads the shared stream (every gate 1) its gradient is zero: with ``on_cut`` given, the node sends
    nothing back (so the shared stream's layers do not back-propagate zeros) and queues ``on_cut`` to run
    once the backward pass is over (the network writes the zero gradients the formula gives its shared
    stream's parameters, so that optimisers treat them alike); without it, a zero tensor. Under
    ``create_graph`` (a second derivative) the backward pass writes the products out in full, so that it
    is differentiable in the gates as the formula is."""

    @staticmethod
    def forward(ctx, gates: Tensor, weights: Tensor, dim: int, need_mix: bool, on_cut: Callable[[], None] | None,
                shared: Tensor, *own: Tensor):
        ctx.set_materialize_grads(False)  # outputs nothing reads send back None, not a tensor of zeros
        masks = gates.detach() > 0.5
        ctx.dim, ctx.on_cut = dim, on_cut
        every, some = torch.stack([masks.all(1), masks.any(1)]).tolist()  # one read (one sync on a GPU)
        ctx.kinds = ["own" if every[t] else "mixed" if some[t] else "shared" for t in range(len(own))]
        outs = []
        for t, o in enumerate(own):
            kind = ctx.kinds[t]
            outs.append(o.view_as(o) if kind == "own" else shared.view_as(shared) if kind == "shared"
                        else torch.lerp(shared, o, _channel_view(gates[t], o.ndim, dim).to(o.dtype)))
        mixed = mix_streams(outs, weights.detach(), dim) if need_mix else shared.new_empty(0)
        if not need_mix:
            ctx.mark_non_differentiable(mixed)
        ctx.need_mix = need_mix
        # a mixed task's φ'_t is kept for β's gradient (the mixture's own backward would keep it too); outputs
        # are saved through save_for_backward, never as attributes of ctx (a reference cycle)
        ctx.selected = [t for t, kind in enumerate(ctx.kinds) if kind == "mixed" and need_mix]
        ctx.save_for_backward(gates, weights, shared, *own, *(outs[t] for t in ctx.selected))
        return (mixed, *outs)

    @staticmethod
    def backward(ctx, grad_mix: Tensor | None, *grad_outs: Tensor | None):
        gates, weights, shared, *rest = ctx.saved_tensors
        own = rest[:len(ctx.kinds)]
        selected_outs = dict(zip(ctx.selected, rest[len(ctx.kinds):]))
        dim, exact = ctx.dim, torch.is_grad_enabled()
        grad_mix = grad_mix if ctx.need_mix else None
        d_gates = torch.zeros_like(gates) if ctx.needs_input_grad[0] else None
        d_weights = torch.zeros_like(weights) if ctx.needs_input_grad[1] and ctx.need_mix else None
        d_shared: Tensor | None = None
        d_own: list[Tensor | None] = []
        for t, o in enumerate(own):
            kind = ctx.kinds[t]
            g = grad_outs[t]
            if grad_mix is not None:
                w = _channel_view(weights[:, t], o.ndim, dim).to(o.dtype)
                g = grad_mix * w if g is None else torch.addcmul(g, grad_mix, w)
            gate = _channel_view(gates[t], o.ndim, dim).to(o.dtype)
            if grad_mix is not None and d_weights is not None:
                selected = (torch.lerp(shared, o, gate) if exact else selected_outs[t] if kind == "mixed"
                            else o if kind == "own" else shared)
                d_weights[:, t] = _channel_dot(grad_mix, selected, dim).to(weights.dtype)
            if g is None:
                d_own.append(None)
                continue
            if exact:  # differentiable in the gates: G ⊙ g and (1 − G) ⊙ g written out
                d_own.append(g * gate)
                d_shared = g * (1 - gate) if d_shared is None else d_shared + g * (1 - gate)
            elif kind == "own":
                d_own.append(g)
            else:
                d_own.append(None if kind == "shared" else g * gate)
                if d_shared is None:  # a buffer of our own, then accumulated in place
                    d_shared = g.clone() if kind == "shared" else g * (1 - gate)
                elif kind == "shared":
                    d_shared.add_(g)
                else:
                    d_shared.addcmul_(g, 1 - gate)
            if d_gates is not None:
                d_gates[t] = _channel_dot(g, o - shared, dim).to(gates.dtype)
        if d_shared is None and ctx.needs_input_grad[5]:  # no task reads the shared stream here: zero gradient
            if ctx.on_cut is None or exact:
                d_shared = torch.zeros_like(shared)
            else:
                torch.autograd.Variable._execution_engine.queue_callback(ctx.on_cut)
        return (d_gates, d_weights, None, None, None, d_shared, *d_own)


def select_and_mix(gates: Tensor, weights: Tensor, shared: Tensor, own: Sequence[Tensor], dim: int,
                   need_mix: bool, on_cut: Callable[[], None] | None = None) -> tuple[Tensor | None, list[Tensor]]:
    """``(ψ' or None, [φ'_t])``: :func:`gate_select` for every task, then (``need_mix``) :func:`mix_streams`
    of the results, as one autograd node (:class:`_SelectMix`; same values, same gradients; ``on_cut``
    documented there)."""
    mixed, *outs = _SelectMix.apply(gates, weights, dim, need_mix, on_cut, shared, *own)
    return (mixed if need_mix else None), list(outs)


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
        #: set by the gated network: writes its shared stream's zero gradients (:class:`_SelectMix`)
        self.on_cut: Callable[[], None] | None = None

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

    def select_and_mix(self, shared: Tensor, own: Sequence[Tensor] | Tensor, need_mix: bool
                       ) -> tuple[Tensor | None, list[Tensor] | Tensor]:
        """:meth:`select`, then (``need_mix``) :meth:`mix` of its result: for streams held one tensor per task
        as one autograd node (:func:`select_and_mix`), for stacked streams the two stacked calls."""
        if isinstance(own, Tensor):
            out = self.select(shared, own)
            return (self.mix(out) if need_mix else None), out
        return select_and_mix(self.gates(), self.mix_weights(), shared, own, self.channel_dim, need_mix, self.on_cut)

    def mix(self, streams: Sequence[Tensor] | Tensor) -> Tensor:
        """The shared stream's next input ``ψ'``; for stacked streams one product and one sum over the task
        axis (the loop's :class:`Mixture` adds task by task: the two agree to float rounding)."""
        if isinstance(streams, Tensor):
            weights = _task_channel_view(self.mix_weights().t(), streams.ndim - 1, self.channel_dim)
            return (streams * weights.to(streams.dtype)).sum(0)
        return mix_streams(streams, self.mix_weights(), self.channel_dim)
