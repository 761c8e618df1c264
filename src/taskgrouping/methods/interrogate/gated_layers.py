"""InterroGate's gated layers (Bejnordi et al., ICML 2024): one layer of the backbone run on the
shared stream and on every task stream in lockstep, gated at its output (see
:mod:`~taskgrouping.methods.interrogate.gates` for ``G``, ``φ'_t`` and the β mixture ``ψ'``).

A layer is gated after its channel-local tail (bias, batch norm, activation, pooling): the finest
granularity at which a channel can leave a stream without touching anything else. A ResNet
``BasicBlock`` is gated after both convolutions (gating only its output would leave ``conv1``
unprunable); a pre-norm ViT ``TransformerBlock`` after q, k, v, the output projection and both FFN
linears. There the residual stream is what one sub-layer hands the next, so the output projection
and ``fc2`` gate the post-residual state ``x_t + φ'_t``, and the shared stream continues from its
β mixture: there is never a shared-to-shared path. Each layer's ``compile`` returns its pruned
equivalent from :mod:`~taskgrouping.methods.interrogate.compiled`.

With ``branch_mode`` stacked the task streams travel between layers as one tensor (T × a stream's
shape): each layer runs its T + 1 copies as one vmapped call on the stacked inputs, selects all tasks'
``φ'_t`` with one ``torch.lerp`` and mixes ``ψ'`` with one product and sum, instead of T of each. In a loop a
layer's selections and mixture are one autograd node (:func:`~taskgrouping.methods.interrogate.gates.select_and_mix`).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from taskgrouping.methods.interrogate.compiled import (TRANSFORMER_ROLES, CompiledBasicBlock, CompiledStreamOp,
                                                        CompiledTransformerBlock, CompiledUnit, GateAssembly,
                                                        multi_head_attention, residual_output, role_key)
from taskgrouping.methods.interrogate.gates import GatePoint
from taskgrouping.methods.interrogate.pruning import prune_output_channels, prune_weight_layer
from taskgrouping.models.resnet import BasicBlock
from taskgrouping.models.stacked import BranchMode, Call, run_branches, stackable, stacked_call
from taskgrouping.models.vit import TransformerBlock

__all__ = ["GatedItem", "GatedUnit", "GatedStreamOp", "GatedBasicBlock", "GatedTransformerBlock"]

#: The task streams between layers: one tensor per task, or stacked along a leading task axis.
Streams = list[Tensor] | Tensor


def _as_list(tasks: Streams) -> list[Tensor]:
    return list(tasks.unbind(0)) if isinstance(tasks, Tensor) else tasks


def _stacked_inputs(first: Tensor | None, tasks: Streams) -> tuple[Tensor, int | None]:
    """The streams' inputs (``first``, the shared stream's, if given, then the tasks') stacked along a new
    leading axis (vmap's ``in_dims`` 0), or the one tensor every stream reads (``None``: the first gated
    layer reads the stem's output)."""
    if isinstance(tasks, Tensor):
        return (tasks, 0) if first is None else (torch.cat([first.unsqueeze(0), tasks]), 0)
    streams = list(tasks) if first is None else [first, *tasks]
    if all(x is streams[0] for x in streams):
        return streams[0], None
    return torch.stack(streams), 0


class GatedItem(nn.Module):
    """One step of the gated network: maps (shared input, task inputs) to (shared output, task
    outputs). ``compile(need_shared_out)`` returns the pruned equivalent and whether it reads its
    shared input."""

    name: str = ""
    #: ``stacked``: the streams' copies of a layer run as one vmapped call (:mod:`taskgrouping.models.stacked`)
    branch_mode: BranchMode = "loop"

    def streams(self, modules: Sequence[nn.Module], inputs: Sequence[Tensor | tuple[Tensor, ...]],
                fn: Call | None = None) -> list[Tensor]:
        """``fn(module, input)`` per stream (default ``module(input)``), stacked or looped (``branch_mode``)."""
        return run_branches(modules, inputs, self.branch_mode, fn)

    def stacks(self, modules: Sequence[nn.Module]) -> bool:
        """Whether these streams run as one stacked call now (``branch_mode`` and :func:`stackable`)."""
        return self.branch_mode == "stacked" and stackable(modules)

    def gate_points(self) -> dict[str, GatePoint]:
        return {}

    def compile(self, need_shared_out: bool) -> tuple[nn.Module, bool]:
        raise TypeError(f"{type(self).__name__} cannot be compiled")


class GatedUnit(GatedItem):
    """A gated layer: ``ops`` = weight layer (``Conv2d`` / ``Linear`` / ``PatchEmbedding``) and its
    channel-local tail, one copy per stream, gated at its output."""

    def __init__(self, name: str, shared: nn.Sequential, tasks: Sequence[nn.Sequential], channels: int,
                 channel_dim: int, gate_init: float) -> None:
        super().__init__()
        self.name = name
        self.shared = shared
        self.tasks = nn.ModuleList(tasks)
        self.gate = GatePoint(len(tasks), channels, channel_dim, gate_init)

    def gate_points(self) -> dict[str, GatePoint]:
        return {self.name: self.gate}

    def forward(self, shared: Tensor, tasks: Streams, need_shared_out: bool) -> tuple[Tensor | None, Streams]:
        modules = [self.shared, *self.tasks]
        if self.stacks(modules):
            x, dim = _stacked_inputs(shared, tasks)
            y = stacked_call(modules, x, in_dims=dim)
            return self.gate.select_and_mix(y[0], y[1:], need_shared_out)
        psi, *own = self.streams(modules, [shared, *_as_list(tasks)])
        return self.gate.select_and_mix(psi, own, need_shared_out)

    def compile(self, need_shared_out: bool) -> tuple[nn.Module, bool]:
        asm = GateAssembly(self.gate.hard_gates(), self.gate.mix_weights(), self.gate.channel_dim, need_shared_out)
        shared = prune_output_channels(self.shared, asm.shared_keep) if asm.n_shared else None
        tasks = [prune_output_channels(m, asm.task_keep(t)) if asm.n_own[t] else None
                 for t, m in enumerate(self.tasks)]
        return CompiledUnit(asm, shared, tasks), asm.n_shared > 0


class GatedStreamOp(GatedItem):
    """An ungated layer (``Flatten``, pooling, ``LayerNorm`` ...) applied to every stream; layers
    with parameters keep one copy per stream."""

    def __init__(self, name: str, shared: nn.Module, tasks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.name = name
        self.per_stream = any(True for _ in shared.parameters()) or any(True for _ in shared.buffers())
        self.shared = shared
        self.tasks = nn.ModuleList(tasks) if self.per_stream else nn.ModuleList()

    def forward(self, shared: Tensor | None, tasks: Streams, need_shared_out: bool
                ) -> tuple[Tensor | None, Streams]:
        run_shared = need_shared_out and shared is not None
        if not self.per_stream:
            out = (vmap(self.shared, randomness="different")(tasks) if isinstance(tasks, Tensor)
                   else [self.shared(x) for x in tasks])
            return (self.shared(shared) if run_shared else None), out
        modules = [self.shared, *self.tasks] if run_shared else list(self.tasks)
        if self.stacks(modules):
            x, dim = _stacked_inputs(shared if run_shared else None, tasks)
            y = stacked_call(modules, x, in_dims=dim)
            return (y[0], y[1:]) if run_shared else (None, y)
        out = self.streams(modules, [shared, *_as_list(tasks)] if run_shared else _as_list(tasks))
        return (out[0], out[1:]) if run_shared else (None, out)

    def compile(self, need_shared_out: bool) -> tuple[nn.Module, bool]:
        tasks = [copy.deepcopy(m) for m in self.tasks] if self.per_stream else [copy.deepcopy(self.shared)]
        shared = copy.deepcopy(self.shared) if need_shared_out else None
        return CompiledStreamOp(tasks, shared, self.per_stream), need_shared_out


class GatedBasicBlock(GatedItem):
    """A ResNet basic block per stream with gates after ``conv1`` (BN, ReLU) and after the output
    (BN, residual sum, ReLU)."""

    def __init__(self, name: str, shared: BasicBlock, tasks: Sequence[BasicBlock], gate_init: float) -> None:
        super().__init__()
        self.name = name
        self.shared = shared
        self.tasks = nn.ModuleList(tasks)
        n = len(tasks)
        self.gates = nn.ModuleDict({"conv1": GatePoint(n, shared.conv1.out_channels, 1, gate_init),
                                    "conv2": GatePoint(n, shared.conv2.out_channels, 1, gate_init)})

    def gate_points(self) -> dict[str, GatePoint]:
        return {f"{self.name}.{k}": g for k, g in self.gates.items()}

    @staticmethod
    def _mid(b: BasicBlock, x: Tensor) -> Tensor:
        return F.relu(b.bn1(b.conv1(x)))

    @staticmethod
    def _out(b: BasicBlock, mid_x: tuple[Tensor, Tensor]) -> Tensor:
        mid, x = mid_x
        return F.relu(b.bn2(b.conv2(mid)) + b.shortcut(x))

    def forward(self, shared: Tensor, tasks: Streams, need_shared_out: bool) -> tuple[Tensor | None, Streams]:
        g1, g2 = self.gates["conv1"], self.gates["conv2"]
        blocks = [self.shared, *self.tasks]
        if self.stacks(blocks):
            x, dim = _stacked_inputs(shared, tasks)
            y = stacked_call(blocks, x, self._mid, dim)
            mid_s, mid = g1.select_and_mix(y[0], y[1:], True)
            y = stacked_call(blocks, (torch.cat([mid_s.unsqueeze(0), mid]), x), self._out, (0, dim))
            return g2.select_and_mix(y[0], y[1:], need_shared_out)
        inputs = [shared, *_as_list(tasks)]
        psi, *own = self.streams(blocks, inputs, self._mid)
        mid_s, mid = g1.select_and_mix(psi, own, True)
        psi, *own = self.streams(blocks, list(zip([mid_s, *mid], inputs)), self._out)
        return g2.select_and_mix(psi, own, need_shared_out)

    def compile(self, need_shared_out: bool) -> tuple[nn.Module, bool]:
        g1, g2 = self.gates["conv1"], self.gates["conv2"]
        out = GateAssembly(g2.hard_gates(), g2.mix_weights(), 1, need_shared_out)
        mid = GateAssembly(g1.hard_gates(), g1.mix_weights(), 1, out.n_shared > 0)

        def mid_ops(b: BasicBlock, keep: Tensor) -> nn.Module:
            return prune_output_channels(nn.Sequential(b.conv1, b.bn1, nn.ReLU()), keep)

        block = CompiledBasicBlock(
            mid, out,
            mid_ops(self.shared, mid.shared_keep) if mid.n_shared else None,
            [mid_ops(b, mid.task_keep(t)) if mid.n_own[t] else None for t, b in enumerate(self.tasks)],
            residual_output(self.shared, out.shared_keep) if out.n_shared else None,
            [residual_output(b, out.task_keep(t)) if out.n_own[t] else None for t, b in enumerate(self.tasks)])
        return block, mid.n_shared > 0 or out.n_shared > 0


def _transformer_linear(block: TransformerBlock, role: str) -> nn.Linear:
    return block.get_submodule(role)


class GatedTransformerBlock(GatedItem):
    """A pre-norm transformer block per stream with gates on q, k, v, the output projection and
    both FFN linears (module docstring: the output projection and ``fc2`` gate the post-residual
    state)."""

    def __init__(self, name: str, shared: TransformerBlock, tasks: Sequence[TransformerBlock],
                 gate_init: float) -> None:
        super().__init__()
        self.name = name
        self.shared = shared
        self.tasks = nn.ModuleList(tasks)
        self.heads = shared.attn.heads
        n = len(tasks)
        self.gates = nn.ModuleDict({role_key(r): GatePoint(n, _transformer_linear(shared, r).out_features, -1,
                                                            gate_init) for r in TRANSFORMER_ROLES})

    def gate_points(self) -> dict[str, GatePoint]:
        return {f"{self.name}.{r}": self.gates[role_key(r)] for r in TRANSFORMER_ROLES}

    def forward(self, shared: Tensor, tasks: Streams, need_shared_out: bool) -> tuple[Tensor | None, Streams]:
        s, g = self.shared, self.gates
        tasks = _as_list(tasks)  # the transformer block runs its streams one after another
        hs, ht = s.norm1(shared), [b.norm1(x) for b, x in zip(self.tasks, tasks)]

        def project(role: str, hs: Tensor, ht: Sequence[Tensor], need_mix: bool) -> tuple[Tensor | None, list[Tensor]]:
            mixed, out = g[role_key(role)].select_and_mix(
                _transformer_linear(s, role)(hs), [_transformer_linear(b, role)(h) for b, h in zip(self.tasks, ht)],
                need_mix)
            return mixed, _as_list(out)

        (qs, q), (ks, k), (vs, v) = (project(r, hs, ht, True) for r in ("attn.q", "attn.k", "attn.v"))
        att_s = multi_head_attention(qs, ks, vs, self.heads)
        att = [multi_head_attention(qt, kt, vt, self.heads) for qt, kt, vt in zip(q, k, v)]
        _, o = project("attn.out", att_s, att, False)
        xt = [x + ot for x, ot in zip(tasks, o)]
        xs = g["attn_out"].mix(xt)
        fs, f = project("ffn.fc1", s.norm2(xs), [b.norm2(x) for b, x in zip(self.tasks, xt)], True)
        _, f2 = project("ffn.fc2", F.gelu(fs), [F.gelu(ft) for ft in f], False)
        xt = [x + ft for x, ft in zip(xt, f2)]
        return (g["ffn_fc2"].mix(xt) if need_shared_out else None), xt

    def compile(self, need_shared_out: bool) -> tuple[nn.Module, bool]:
        g = self.gates
        masks = {r: g[role_key(r)].hard_gates() for r in TRANSFORMER_ROLES}
        kept_shared = {r: bool((~m).any()) for r, m in masks.items()}
        # Which shared-stream mixtures are read downstream inside (or after) this block.
        need_mix = {"attn.q": kept_shared["attn.out"], "attn.k": kept_shared["attn.out"],
                    "attn.v": kept_shared["attn.out"], "attn.out": kept_shared["ffn.fc1"],
                    "ffn.fc1": kept_shared["ffn.fc2"], "ffn.fc2": need_shared_out}
        asm = {r: GateAssembly(masks[r], g[role_key(r)].mix_weights(), -1, need_mix[r]) for r in TRANSFORMER_ROLES}

        def pruned(block: TransformerBlock, role: str, keep: Tensor) -> nn.Module:
            return prune_weight_layer(_transformer_linear(block, role), keep)

        shared: dict[str, nn.Module] = {}
        if any(kept_shared[r] for r in ("attn.q", "attn.k", "attn.v")):
            shared["norm1"] = copy.deepcopy(self.shared.norm1)
        if kept_shared["ffn.fc1"]:
            shared["norm2"] = copy.deepcopy(self.shared.norm2)
        for r in TRANSFORMER_ROLES:
            if kept_shared[r]:
                shared[role_key(r)] = pruned(self.shared, r, asm[r].shared_keep)
        tasks = []
        for t, b in enumerate(self.tasks):
            d: dict[str, nn.Module] = {"norm1": copy.deepcopy(b.norm1), "norm2": copy.deepcopy(b.norm2)}
            for r in TRANSFORMER_ROLES:
                if asm[r].n_own[t]:
                    d[role_key(r)] = pruned(b, r, asm[r].task_keep(t))
            tasks.append(d)
        uses_input = any(kept_shared[r] for r in ("attn.q", "attn.k", "attn.v"))
        return CompiledTransformerBlock(self.heads, asm, shared, tasks), uses_input
