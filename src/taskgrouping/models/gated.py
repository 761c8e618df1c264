"""InterroGate's gated multi-task network (Bejnordi et al., ICML 2024) and its compilation to a
static, pruned network.

The network runs ``T + 1`` streams of the same backbone in lockstep: one *shared* stream and one
stream per task. At every gated layer ℓ, with ``φ_t`` the task stream's output and ``ψ`` the
shared stream's output (``C`` channels each)::

    G_t   = 1[σ(α_t) > 0.5]                      (hard in the forward pass; straight-through
                                                  gradient dG/dα = σ'(α) in the backward pass)
    φ'_t  = G_t ⊙ φ_t + (1 − G_t) ⊙ ψ            (what task t's next layer reads)
    ψ'    = Σ_t softmax_t(β)_c ⊙ φ'_t            (what the shared stream's next layer reads;
                                                  β is C × T, softmax over tasks per channel)

There is no direct shared-to-shared path: the shared stream only ever reads the β-mixture of the
tasks' gated features, so its channels matter only where some task selects them.

**Gating granularity.** Every layer that produces channels is gated, at its output after the
layer's channel-local tail (bias, batch norm, activation, pooling), because that is the finest
granularity at which a channel can be removed from a branch without touching anything else:

* ``nn.Sequential`` blocks (``small_cnn``, ``mlp``, the ResNet stems, ``tag_resnet``'s stem) are
  walked down to their layers; each ``Conv2d`` / ``Linear`` together with the channel-local
  layers after it is one gated layer. Layers in between that mix channels (``Flatten``,
  ``LayerNorm``) run on every stream without a gate, with their own per-stream copy when they
  have parameters.
* ResNet ``BasicBlock``: both convolutions are gated (``conv1`` after BN + ReLU, ``conv2`` after
  BN, the residual sum and ReLU). Gating only the block output would leave ``conv1`` - half of
  the block's compute - unprunable; gating per convolution is the paper's "per layer".
* ViT ``TransformerBlock``: the q, k, v, output projection and both FFN linears are gated (the
  paper's transformer variant); ``PatchEmbedding`` is gated on its token channels. In a pre-norm
  transformer the representation handed from one sub-layer to the next is the residual stream,
  so at the output projection and ``fc2`` the task feature is the post-residual state
  ``x_t + φ'_t`` and the shared stream continues from ``Σ_t softmax(β)_c ⊙ (x_t + φ'_t)``: again
  no shared-to-shared path.

**Compilation.** With the gates fixed, task ``t``'s copy of a layer only needs the channels with
``G_t = 1`` and the shared copy only the channels some task reads (``G_t = 0`` for some ``t``);
the rest are removed (output rows of the weight and of the following batch norm). The
:class:`CompiledInterroGate` computes exactly those channels and re-assembles each task's
``φ'_t`` by indexing, so its outputs equal the gated network's in eval mode. It is an ordinary
module built from ``torch.nn`` layers and this package's modules; :func:`save_compiled` writes it
as safetensors weights plus a JSON description from which :func:`load_compiled` rebuilds it
without the gated network or the backbone builders.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from taskgrouping.models.resnet import BasicBlock, ZeroPadShortcut
from taskgrouping.models.vit import PatchEmbedding, TransformerBlock

#: Elementwise layers a gated layer may end with (any weight layer).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Identity,
                nn.Dropout)
#: Channel-local layers a convolution may end with (they act on each channel on its own).
_CONV_TAIL = _ELEMENTWISE + (nn.BatchNorm2d, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
#: Channel-local layers a linear layer on (B, C) vectors may end with.
_LINEAR_TAIL = _ELEMENTWISE + (nn.BatchNorm1d,)
#: Layers with parameters that run ungated on every stream (each stream has its own copy).
_STREAM_LAYERS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
TRANSFORMER_ROLES = ("attn.q", "attn.k", "attn.v", "attn.out", "ffn.fc1", "ffn.fc2")


# ---------------------------------------------------------------------------------------------
# Gate primitives
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Pruning one layer's output channels
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Compiled building blocks
# ---------------------------------------------------------------------------------------------

class GateAssembly(nn.Module):
    """Re-assembles every task's ``φ'_t`` of one gated layer from the channels the compiled
    network computes: task ``t``'s kept own channels followed by the shared kept channels,
    gathered by a fixed index. Also mixes the shared stream's next input when it is needed.

    Args:
        masks: ``G`` as bool (T × C).
        mix: ``softmax(β)`` (C × T).
        channel_dim: channel dimension of the features.
        mixture: whether the shared stream's next input is needed downstream.
    """

    def __init__(self, masks: Tensor, mix: Tensor, channel_dim: int, mixture: bool) -> None:
        super().__init__()
        masks = masks.detach().bool().cpu()
        n_tasks, channels = masks.shape
        shared_keep = (~masks).any(0).nonzero().flatten()
        pos_shared = torch.full((channels,), -1, dtype=torch.long)
        pos_shared[shared_keep] = torch.arange(len(shared_keep))
        self.channel_dim = int(channel_dim)
        self.mixture = bool(mixture)
        self.n_tasks = int(n_tasks)
        self.n_own = [int(masks[t].sum()) for t in range(n_tasks)]
        self.uses_shared = [bool((~masks[t]).any()) for t in range(n_tasks)]
        self.register_buffer("shared_keep", shared_keep)
        for t in range(n_tasks):
            own = masks[t].nonzero().flatten()
            index = torch.empty(channels, dtype=torch.long)
            index[own] = torch.arange(len(own))
            index[~masks[t]] = self.n_own[t] + pos_shared[~masks[t]]
            self.register_buffer(f"keep_{t}", own)
            self.register_buffer(f"index_{t}", index)
        # A task whose parts already are its channels in order needs no gather.
        self.gather = [not (self.n_own[t] + (self.n_shared if self.uses_shared[t] else 0) == channels
                            and torch.equal(getattr(self, f"index_{t}"), torch.arange(channels)))
                       for t in range(n_tasks)]
        self.register_buffer("mix", mix.detach().clone() if mixture else torch.zeros(0))

    @property
    def n_shared(self) -> int:
        return int(self.shared_keep.numel())

    def task_keep(self, t: int) -> Tensor:
        return getattr(self, f"keep_{t}")

    def forward(self, shared_part: Tensor | None, own_parts: Sequence[Tensor | None]) -> list[Tensor]:
        out = []
        for t in range(self.n_tasks):
            parts = []
            if self.n_own[t]:
                parts.append(own_parts[t])
            if self.uses_shared[t]:
                parts.append(shared_part)
            full = parts[0] if len(parts) == 1 else torch.cat(parts, self.channel_dim)
            out.append(full.index_select(self.channel_dim, getattr(self, f"index_{t}")) if self.gather[t] else full)
        return out

    def mix_streams(self, streams: Sequence[Tensor]) -> Tensor:
        return mix_streams(streams, self.mix, self.channel_dim)


class CompiledUnit(nn.Module):
    """A pruned gated layer: the shared and per-task copies compute only their kept channels."""

    def __init__(self, assembly: GateAssembly, shared: nn.Module | None, tasks: Sequence[nn.Module | None]) -> None:
        super().__init__()
        self.assembly = assembly
        self.has_shared = shared is not None
        self.has_own = [m is not None for m in tasks]
        self.shared = shared if shared is not None else nn.Identity()
        self.tasks = nn.ModuleList(m if m is not None else nn.Identity() for m in tasks)

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        sp = self.shared(shared) if self.has_shared else None
        own = [m(x) if h else None for m, x, h in zip(self.tasks, tasks, self.has_own)]
        out = self.assembly(sp, own)
        return (self.assembly.mix_streams(out) if self.assembly.mixture else None), out


class CompiledStreamOp(nn.Module):
    """An ungated layer on every stream: one copy per task when it has parameters or buffers
    (``per_stream``), else ``tasks[0]`` serves every stream; ``shared`` only while the shared
    stream is still needed."""

    def __init__(self, tasks: Sequence[nn.Module], shared: nn.Module | None, per_stream: bool) -> None:
        super().__init__()
        self.per_stream = bool(per_stream)
        self.tasks = nn.ModuleList(tasks)
        self.has_shared = shared is not None
        self.shared = shared if shared is not None else nn.Identity()

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        out = [m(x) for m, x in zip(self.tasks, tasks)] if self.per_stream else [self.tasks[0](x) for x in tasks]
        return (self.shared(shared) if self.has_shared else None), out


class ResidualOutput(nn.Module):
    """``relu(norm(conv(mid)) + shortcut(x))`` of a ResNet basic block for a subset of its output
    channels (``shortcut_index`` picks them from a parameter-free shortcut)."""

    def __init__(self, conv: nn.Module, norm: nn.Module, shortcut: nn.Module, shortcut_index: Tensor | None) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.shortcut = shortcut
        self.select_shortcut = shortcut_index is not None
        self.register_buffer("shortcut_index", shortcut_index if shortcut_index is not None
                             else torch.zeros(0, dtype=torch.long))

    def forward(self, mid: Tensor, x: Tensor) -> Tensor:
        s = self.shortcut(x)
        if self.select_shortcut:
            s = s.index_select(1, self.shortcut_index)
        return F.relu(self.norm(self.conv(mid)) + s)


def _residual_output(block: BasicBlock, keep: Tensor) -> ResidualOutput:
    conv = prune_weight_layer(block.conv2, keep)
    norm = prune_norm(block.bn2, keep)
    if isinstance(block.shortcut, (nn.Identity, ZeroPadShortcut)):
        return ResidualOutput(conv, norm, copy.deepcopy(block.shortcut), keep.clone())
    return ResidualOutput(conv, norm, prune_output_channels(block.shortcut, keep), None)


class CompiledBasicBlock(nn.Module):
    """A pruned gated ResNet basic block (gates after ``conv1`` and after the residual sum)."""

    def __init__(self, mid: GateAssembly, out: GateAssembly, shared_mid: nn.Module | None,
                 task_mid: Sequence[nn.Module | None], shared_out: nn.Module | None,
                 task_out: Sequence[nn.Module | None]) -> None:
        super().__init__()
        self.mid = CompiledUnit(mid, shared_mid, task_mid)
        self.out_assembly = out
        self.has_shared_out = shared_out is not None
        self.has_own_out = [m is not None for m in task_out]
        self.shared_out = shared_out if shared_out is not None else nn.Identity()
        self.task_out = nn.ModuleList(m if m is not None else nn.Identity() for m in task_out)

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        mid_s, mid = self.mid(shared, tasks)
        sp = self.shared_out(mid_s, shared) if self.has_shared_out else None
        own = [m(h, x) if keep else None for m, h, x, keep in zip(self.task_out, mid, tasks, self.has_own_out)]
        out = self.out_assembly(sp, own)
        return (self.out_assembly.mix_streams(out) if self.out_assembly.mixture else None), out


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Scaled dot-product attention of already projected ``(B, L, D)`` queries, keys and values,
    with the same operations as :class:`~taskgrouping.models.vit.MultiHeadSelfAttention`."""
    b, n, _ = q.shape

    def split(t: Tensor) -> Tensor:
        return t.reshape(b, n, heads, -1).transpose(1, 2)

    y = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return y.transpose(1, 2).reshape(b, n, -1)


def _role_key(role: str) -> str:
    return role.replace(".", "_")


class CompiledTransformerBlock(nn.Module):
    """A pruned gated pre-norm transformer block. ``shared`` holds only what the shared stream
    still computes (keys ``norm1``, ``attn_q``, ..., ``norm2``, ``ffn_fc2``); ``tasks[t]`` holds
    task ``t``'s norms and the projections with at least one kept channel."""

    def __init__(self, heads: int, assemblies: Mapping[str, GateAssembly], shared: Mapping[str, nn.Module],
                 tasks: Sequence[Mapping[str, nn.Module]]) -> None:
        super().__init__()
        self.heads = int(heads)
        self.assemblies = nn.ModuleDict({_role_key(r): assemblies[r] for r in TRANSFORMER_ROLES})
        self.shared = nn.ModuleDict(dict(shared))
        self.tasks = nn.ModuleList(nn.ModuleDict(dict(m)) for m in tasks)

    def _project(self, key: str, hs: Tensor | None, ht: Sequence[Tensor]) -> list[Tensor]:
        sp = self.shared[key](hs) if key in self.shared else None
        own = [d[key](h) if key in d else None for d, h in zip(self.tasks, ht)]
        return self.assemblies[key](sp, own)

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        a = self.assemblies
        hs = self.shared["norm1"](shared) if "norm1" in self.shared else None
        ht = [d["norm1"](x) for d, x in zip(self.tasks, tasks)]
        q, k, v = (self._project(key, hs, ht) for key in ("attn_q", "attn_k", "attn_v"))
        att = [multi_head_attention(qt, kt, vt, self.heads) for qt, kt, vt in zip(q, k, v)]
        att_s = (multi_head_attention(a["attn_q"].mix_streams(q), a["attn_k"].mix_streams(k),
                                      a["attn_v"].mix_streams(v), self.heads) if "attn_out" in self.shared else None)
        o = self._project("attn_out", att_s, att)
        xt = [x + ot for x, ot in zip(tasks, o)]
        hs = self.shared["norm2"](a["attn_out"].mix_streams(xt)) if "norm2" in self.shared else None
        ht = [d["norm2"](x) for d, x in zip(self.tasks, xt)]
        f = self._project("ffn_fc1", hs, ht)
        fs = F.gelu(a["ffn_fc1"].mix_streams(f)) if "ffn_fc2" in self.shared else None
        f2 = self._project("ffn_fc2", fs, [F.gelu(ft) for ft in f])
        xt = [x + ft for x, ft in zip(xt, f2)]
        return (a["ffn_fc2"].mix_streams(xt) if a["ffn_fc2"].mixture else None), xt


class CompiledInterroGate(nn.Module):
    """The static network InterroGate leaves at inference: ``forward(x) -> {task: prediction}``.

    ``stem`` (the ungated shared prefix) runs once; ``items`` run the pruned shared and task
    streams; ``heads[i]`` predicts ``task_names[i]``.
    """

    def __init__(self, stem: nn.Module, items: Sequence[nn.Module], heads: Sequence[nn.Module],
                 task_names: Sequence[str]) -> None:
        super().__init__()
        self.stem = stem
        self.items = nn.ModuleList(items)
        self.heads = nn.ModuleList(heads)
        self.task_names = list(task_names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.stem(x)
        shared: Tensor | None = z
        tasks = [z] * len(self.task_names)
        for item in self.items:
            shared, tasks = item(shared, tasks)
        return {t: h(f) for t, h, f in zip(self.task_names, self.heads, tasks)}


# ---------------------------------------------------------------------------------------------
# Gated items (training-time network pieces)
# ---------------------------------------------------------------------------------------------

class GatedItem(nn.Module):
    """One step of the gated network: maps (shared input, task inputs) to (shared output, task
    outputs). ``compile(need_shared_out)`` returns the pruned equivalent and whether it reads its
    shared input."""

    name: str = ""

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

    def forward(self, shared: Tensor, tasks: list[Tensor], need_shared_out: bool
                ) -> tuple[Tensor | None, list[Tensor]]:
        out = self.gate.select(self.shared(shared), [m(x) for m, x in zip(self.tasks, tasks)])
        return (self.gate.mix(out) if need_shared_out else None), out

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

    def forward(self, shared: Tensor | None, tasks: list[Tensor], need_shared_out: bool
                ) -> tuple[Tensor | None, list[Tensor]]:
        out = [m(x) for m, x in zip(self.tasks, tasks)] if self.per_stream else [self.shared(x) for x in tasks]
        return (self.shared(shared) if need_shared_out and shared is not None else None), out

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
    def _out(b: BasicBlock, mid: Tensor, x: Tensor) -> Tensor:
        return F.relu(b.bn2(b.conv2(mid)) + b.shortcut(x))

    def forward(self, shared: Tensor, tasks: list[Tensor], need_shared_out: bool
                ) -> tuple[Tensor | None, list[Tensor]]:
        g1, g2 = self.gates["conv1"], self.gates["conv2"]
        mid = g1.select(self._mid(self.shared, shared), [self._mid(b, x) for b, x in zip(self.tasks, tasks)])
        out = g2.select(self._out(self.shared, g1.mix(mid), shared),
                        [self._out(b, m, x) for b, m, x in zip(self.tasks, mid, tasks)])
        return (g2.mix(out) if need_shared_out else None), out

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
            _residual_output(self.shared, out.shared_keep) if out.n_shared else None,
            [_residual_output(b, out.task_keep(t)) if out.n_own[t] else None for t, b in enumerate(self.tasks)])
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
        self.gates = nn.ModuleDict({_role_key(r): GatePoint(n, _transformer_linear(shared, r).out_features, -1,
                                                            gate_init) for r in TRANSFORMER_ROLES})

    def gate_points(self) -> dict[str, GatePoint]:
        return {f"{self.name}.{r}": self.gates[_role_key(r)] for r in TRANSFORMER_ROLES}

    def forward(self, shared: Tensor, tasks: list[Tensor], need_shared_out: bool
                ) -> tuple[Tensor | None, list[Tensor]]:
        s, g = self.shared, self.gates
        hs, ht = s.norm1(shared), [b.norm1(x) for b, x in zip(self.tasks, tasks)]

        def project(role: str, key: str, hs: Tensor, ht: Sequence[Tensor]) -> list[Tensor]:
            return g[key].select(_transformer_linear(s, role)(hs),
                                 [_transformer_linear(b, role)(h) for b, h in zip(self.tasks, ht)])

        q, k, v = (project(r, _role_key(r), hs, ht) for r in ("attn.q", "attn.k", "attn.v"))
        att_s = multi_head_attention(g["attn_q"].mix(q), g["attn_k"].mix(k), g["attn_v"].mix(v), self.heads)
        att = [multi_head_attention(qt, kt, vt, self.heads) for qt, kt, vt in zip(q, k, v)]
        o = project("attn.out", "attn_out", att_s, att)
        xt = [x + ot for x, ot in zip(tasks, o)]
        xs = g["attn_out"].mix(xt)
        f = project("ffn.fc1", "ffn_fc1", s.norm2(xs), [b.norm2(x) for b, x in zip(self.tasks, xt)])
        f2 = project("ffn.fc2", "ffn_fc2", F.gelu(g["ffn_fc1"].mix(f)), [F.gelu(ft) for ft in f])
        xt = [x + ft for x, ft in zip(xt, f2)]
        return (g["ffn_fc2"].mix(xt) if need_shared_out else None), xt

    def compile(self, need_shared_out: bool) -> tuple[nn.Module, bool]:
        g = self.gates
        masks = {r: g[_role_key(r)].hard_gates() for r in TRANSFORMER_ROLES}
        kept_shared = {r: bool((~m).any()) for r, m in masks.items()}
        # Which shared-stream mixtures are read downstream inside (or after) this block.
        need_mix = {"attn.q": kept_shared["attn.out"], "attn.k": kept_shared["attn.out"],
                    "attn.v": kept_shared["attn.out"], "attn.out": kept_shared["ffn.fc1"],
                    "ffn.fc1": kept_shared["ffn.fc2"], "ffn.fc2": need_shared_out}
        asm = {r: GateAssembly(masks[r], g[_role_key(r)].mix_weights(), -1, need_mix[r]) for r in TRANSFORMER_ROLES}

        def pruned(block: TransformerBlock, role: str, keep: Tensor) -> nn.Module:
            return prune_weight_layer(_transformer_linear(block, role), keep)

        shared: dict[str, nn.Module] = {}
        if any(kept_shared[r] for r in ("attn.q", "attn.k", "attn.v")):
            shared["norm1"] = copy.deepcopy(self.shared.norm1)
        if kept_shared["ffn.fc1"]:
            shared["norm2"] = copy.deepcopy(self.shared.norm2)
        for r in TRANSFORMER_ROLES:
            if kept_shared[r]:
                shared[_role_key(r)] = pruned(self.shared, r, asm[r].shared_keep)
        tasks = []
        for t, b in enumerate(self.tasks):
            d: dict[str, nn.Module] = {"norm1": copy.deepcopy(b.norm1), "norm2": copy.deepcopy(b.norm2)}
            for r in TRANSFORMER_ROLES:
                if asm[r].n_own[t]:
                    d[_role_key(r)] = pruned(b, r, asm[r].task_keep(t))
            tasks.append(d)
        uses_input = any(kept_shared[r] for r in ("attn.q", "attn.k", "attn.v"))
        return CompiledTransformerBlock(self.heads, asm, shared, tasks), uses_input


# ---------------------------------------------------------------------------------------------
# The gated network
# ---------------------------------------------------------------------------------------------

class GatedNetwork(nn.Module):
    """InterroGate's training-time network: ungated shared ``stem``, gated ``items`` running the
    shared and task streams, one head per task (reading ``φ'_t`` of the last layer).

    Build it with :func:`build_gated_network`.
    """

    def __init__(self, stem: nn.Module, items: Sequence[GatedItem], heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        gated = [i for i, item in enumerate(items) if item.gate_points()]
        if not gated:
            raise ValueError("InterroGate found no layer to gate (expected Conv2d / Linear layers, ResNet "
                             "BasicBlocks or ViT blocks after the shared stem)")
        self.stem = stem
        self.items = nn.ModuleList(items)
        # Task names are kept in a list because nn.ModuleDict rejects names containing '.'.
        self.task_names: list[str] = list(heads)
        self.heads = nn.ModuleList(heads.values())
        self.last_gated = gated[-1]

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.stem(x)
        shared: Tensor | None = z
        tasks = [z] * self.n_tasks
        for i, item in enumerate(self.items):
            shared, tasks = item(shared, tasks, i < self.last_gated)
        return {t: h(f) for t, h, f in zip(self.task_names, self.heads, tasks)}

    def gate_points(self) -> dict[str, GatePoint]:
        """Gated layer name (its path in the backbone) -> gate, in network order."""
        out: dict[str, GatePoint] = {}
        for item in self.items:
            out.update(item.gate_points())
        return out

    def gate_parameters(self) -> list[nn.Parameter]:
        """Every α and β (trained by the gates' own optimiser)."""
        return [p for g in self.gate_points().values() for p in (g.alpha, g.beta)]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the gates' (trained by the main optimiser)."""
        gates = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gates and p.requires_grad]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters several tasks read: the stem and the shared stream."""
        params = list(self.stem.parameters())
        for item in self.items:
            if isinstance(item, (GatedUnit, GatedBasicBlock, GatedTransformerBlock)) or (
                    isinstance(item, GatedStreamOp) and item.per_stream):
                params += list(item.shared.parameters())
        return [p for p in params if p.requires_grad]

    def hard_gates(self) -> dict[str, Tensor]:
        """Gated layer name -> ``G`` as bool (T × C)."""
        return {k: g.hard_gates() for k, g in self.gate_points().items()}

    @torch.no_grad()
    def set_gates(self, masks: Mapping[str, Tensor], logit: float = 4.0) -> None:
        """Force gates: ``α = +logit`` where ``masks`` is true (task-specific), ``−logit`` elsewhere."""
        points = self.gate_points()
        for name, m in masks.items():
            if name not in points:
                raise ValueError(f"unknown gated layer {name!r}; expected one of {list(points)}")
            g = points[name]
            m = torch.as_tensor(m, dtype=torch.bool, device=g.alpha.device)
            if m.shape != g.alpha.shape:
                raise ValueError(f"gates for {name!r} must have shape {tuple(g.alpha.shape)} (tasks x channels), "
                                 f"got {tuple(m.shape)}")
            g.alpha.copy_(torch.where(m, logit, -logit))

    def gate_usage(self) -> Tensor:
        """Per task, ``mean_ℓ mean_c σ(α_t^ℓ)`` (T,), with graph (what the sparsity loss reads)."""
        per_layer = [torch.sigmoid(g.alpha).mean(1) for g in self.gate_points().values()]
        return torch.stack(per_layer).mean(0)

    @torch.no_grad()
    def sharing_pattern(self) -> list[dict[str, Any]]:
        """Per gated layer: channels, the fraction of task-specific channels per task, the shared
        channels kept, and which task dominates the shared mix (β) - InterroGate Fig. 3."""
        rows = []
        for name, g in self.gate_points().items():
            masks = g.hard_gates()
            w = g.mix_weights()
            # a channel counts for the task(s) with the largest β; ties are split evenly
            is_top = w >= w.max(1, keepdim=True).values - 1e-6
            top = is_top.float() / is_top.sum(1, keepdim=True)
            rows.append({
                "layer": name,
                "channels": g.channels,
                "task_specific_fraction": {t: float(masks[i].float().mean()) for i, t in enumerate(self.task_names)},
                "shared_channels_kept": int((~masks).any(0).sum()),
                "beta_top_fraction": {t: float(top[:, i].mean()) for i, t in enumerate(self.task_names)},
                "beta_mean": {t: float(w[:, i].mean()) for i, t in enumerate(self.task_names)},
            })
        return rows

    def compile(self) -> CompiledInterroGate:
        """The static pruned network with the same eval-mode outputs (module docstring)."""
        compiled: list[nn.Module] = []
        need = False  # does the next item read the shared stream? (nothing after the last item does)
        for item in reversed(self.items):
            module, need = item.compile(need)
            compiled.append(module)
        net = CompiledInterroGate(copy.deepcopy(self.stem), compiled[::-1], [copy.deepcopy(h) for h in self.heads],
                                  self.task_names)
        device = next(self.parameters()).device
        return net.to(device).train(self.training)


def _plan(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """Split a backbone into (kind, module paths) steps: ``unit`` (weight layer + tail),
    ``basic``, ``transformer`` or ``op`` (ungated)."""
    plan: list[tuple[str, list[str]]] = []
    unit: list[str] | None = None
    tail: tuple[type, ...] = ()

    def close() -> None:
        nonlocal unit
        if unit is not None:
            plan.append(("unit", unit))
            unit = None

    def walk(m: nn.Module, path: str) -> None:
        nonlocal unit, tail
        if isinstance(m, nn.Sequential):
            for name, child in m.named_children():
                walk(child, f"{path}.{name}" if path else name)
            return
        if isinstance(m, BasicBlock):
            close()
            plan.append(("basic", [path]))
            return
        if isinstance(m, TransformerBlock):
            close()
            plan.append(("transformer", [path]))
            return
        if isinstance(m, PatchEmbedding) or isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            close()
            unit = [path]
            tail = _LINEAR_TAIL if isinstance(m, nn.Linear) else (_ELEMENTWISE if isinstance(m, PatchEmbedding)
                                                                 else _CONV_TAIL)
            return
        if unit is not None and isinstance(m, tail):
            unit.append(path)
            return
        close()
        if any(True for _ in m.parameters()) and not isinstance(m, _STREAM_LAYERS):
            raise ValueError(f"InterroGate cannot gate layer {path!r} ({type(m).__name__}); it gates Conv2d "
                             "(groups=1), Linear, ResNet BasicBlock and ViT PatchEmbedding / TransformerBlock layers "
                             "and runs parameter-free layers and norms ungated")
        plan.append(("op", [path]))

    walk(backbone, "")
    close()
    return plan


def _structure(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def build_gated_network(shared: nn.Module, tasks: Mapping[str, nn.Module], heads: Mapping[str, nn.Module],
                        stem: nn.Module | None = None, gate_init: float = 1.0) -> GatedNetwork:
    """Build InterroGate's gated network from one shared backbone and one backbone per task.

    Args:
        shared: the shared branch (e.g. the naive-MTL branch); an ``nn.Sequential`` of blocks.
        tasks: task name -> that task's branch, same architecture as ``shared`` (e.g. the
            single-task branches).
        heads: task name -> head reading the task's last gated features.
        stem: ungated prefix shared by every stream (the branched model's shared blocks).
        gate_init: initial gate logit α (> 0: every task starts on its own branch).

    Every module is deep-copied, so the sources are left untouched.
    """
    names = list(tasks)
    if not names:
        raise ValueError("InterroGate needs at least one task")
    if set(heads) != set(names):
        raise ValueError(f"heads {sorted(heads)} must be given for exactly the tasks {sorted(names)}")
    ref = _structure(shared)
    for t, b in tasks.items():
        if _structure(b) != ref:
            raise ValueError(f"the branch of task {t!r} does not have the shared branch's architecture; "
                             "InterroGate needs the same backbone for every stream")
    shared = copy.deepcopy(shared)
    branches = [copy.deepcopy(tasks[t]) for t in names]
    items: list[GatedItem] = []
    for kind, paths in _plan(shared):
        name = paths[0]
        if kind == "unit":
            first = shared.get_submodule(paths[0])
            channels = (first.proj.out_channels if isinstance(first, PatchEmbedding) else
                        first.out_features if isinstance(first, nn.Linear) else first.out_channels)
            dim = 1 if isinstance(first, nn.Conv2d) else -1
            if isinstance(first, PatchEmbedding):
                name = f"{name}.proj"
            items.append(GatedUnit(name, nn.Sequential(*[shared.get_submodule(p) for p in paths]),
                                   [nn.Sequential(*[b.get_submodule(p) for p in paths]) for b in branches],
                                   channels, dim, gate_init))
        elif kind == "basic":
            items.append(GatedBasicBlock(name, shared.get_submodule(name),
                                         [b.get_submodule(name) for b in branches], gate_init))
        elif kind == "transformer":
            items.append(GatedTransformerBlock(name, shared.get_submodule(name),
                                               [b.get_submodule(name) for b in branches], gate_init))
        else:
            items.append(GatedStreamOp(name, shared.get_submodule(name), [b.get_submodule(name) for b in branches]))
    if not any(item.gate_points() for item in items):
        layers = sorted({type(m).__name__ for m in shared.modules() if not list(m.children())})
        raise ValueError(f"InterroGate found no layer to gate in the backbone (layers: {layers}); it gates Conv2d, "
                         "Linear, ResNet BasicBlock and ViT blocks - check model.backbone and model.shared_blocks")
    return GatedNetwork(copy.deepcopy(stem) if stem is not None else nn.Identity(), items,
                        {t: copy.deepcopy(heads[t]) for t in names})


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one eval-mode forward pass on one input (``torch.utils.flop_counter``: matrix
    products, convolutions and attention; elementwise work is not counted)."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else "cpu"
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *[int(s) for s in input_shape], device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> int:
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ---------------------------------------------------------------------------------------------
# Saving and loading the compiled network
# ---------------------------------------------------------------------------------------------

FORMAT = "taskgrouping.interrogate.compiled"
#: Modules a saved architecture may name: only library code is ever instantiated.
_ALLOWED_MODULE_PREFIXES = ("torch.nn.modules.", "taskgrouping.models.")
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.bool)}


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    raise ValueError(f"cannot describe {where} (a {type(value).__name__}) in the JSON architecture")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(_decode(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def describe_module(module: nn.Module, path: str = "model") -> dict[str, Any]:
    """A JSON-able description of ``module``: class, plain attributes, parameter and buffer
    shapes and children (weights are stored separately)."""
    cls = type(module)
    if not cls.__module__.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ValueError(f"cannot save {path}: {cls.__module__}.{cls.__qualname__} is not a torch.nn or taskgrouping "
                         "module")
    if module._non_persistent_buffers_set:
        raise ValueError(f"cannot save {path}: non-persistent buffers {sorted(module._non_persistent_buffers_set)}")
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "attributes": {k: _encode(v, f"{path}.{k}") for k, v in vars(module).items() if k not in _MODULE_INTERNALS},
        "parameters": {k: None if p is None else {"shape": list(p.shape), "dtype": str(p.dtype)}
                       for k, p in module._parameters.items()},
        "buffers": {k: None if b is None else {"shape": list(b.shape), "dtype": str(b.dtype)}
                    for k, b in module._buffers.items()},
        "children": {k: None if c is None else describe_module(c, f"{path}.{k}") for k, c in module._modules.items()},
    }


def _empty(spec: dict[str, Any], where: str) -> Tensor:
    dtype = _DTYPES.get(spec.get("dtype", ""))
    if dtype is None:
        raise ValueError(f"{where}: unsupported dtype {spec.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
    return torch.empty([int(s) for s in spec["shape"]], dtype=dtype)


def module_from_description(spec: dict[str, Any], path: str = "model") -> nn.Module:
    """Rebuild (with uninitialised weights) the module :func:`describe_module` described. Only
    classes from ``torch.nn`` and ``taskgrouping.models`` are instantiated, without running their
    constructors."""
    try:
        qual = spec["class"]
        module_name, _, cls_name = qual.rpartition(".")
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: expected a module description with a 'class' key") from None
    if not module_name.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ValueError(f"{path}: class {qual!r} is not a torch.nn or taskgrouping.models module")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(f"{path}: unknown class {qual!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path}: {qual!r} is not an nn.Module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for k, v in spec.get("attributes", {}).items():
        setattr(module, k, _decode(v))
    for k, p in spec.get("parameters", {}).items():
        if p is None:
            module.register_parameter(k, None)
        else:
            t = _empty(p, f"{path}.{k}")
            module.register_parameter(k, nn.Parameter(t, requires_grad=t.is_floating_point()))
    for k, b in spec.get("buffers", {}).items():
        module.register_buffer(k, None if b is None else _empty(b, f"{path}.{k}"))
    for k, c in spec.get("children", {}).items():
        module.add_module(k, None if c is None else module_from_description(c, f"{path}.{k}"))
    return module


def save_compiled(model: CompiledInterroGate, directory: Path | str) -> Path:
    """Write ``model.safetensors`` (weights) and ``architecture.json`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arch = {"format": FORMAT, "version": 1, "task_names": list(model.task_names),
            "architecture": describe_module(model)}
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    tmp = out / "architecture.json.tmp"
    tmp.write_text(json.dumps(arch, indent=1))
    tmp.replace(out / "architecture.json")
    return out


def load_compiled(directory: Path | str, device: str | torch.device = "cpu") -> CompiledInterroGate:
    """Rebuild a network written by :func:`save_compiled` (in eval mode)."""
    d = Path(directory)
    arch_file, weights_file = d / "architecture.json", d / "model.safetensors"
    for f in (arch_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; expected a directory written by save_compiled")
    try:
        arch = json.loads(arch_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{arch_file}: not valid JSON ({exc})") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise ValueError(f"{arch_file}: expected format {FORMAT!r}, got {arch.get('format') if isinstance(arch, dict) else arch!r}")
    model = module_from_description(arch["architecture"])
    if not isinstance(model, CompiledInterroGate):
        raise ValueError(f"{arch_file}: the top module is {type(model).__name__}, expected CompiledInterroGate")
    try:
        model.load_state_dict(load_file(str(weights_file)), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_file} does not fit {arch_file}: {exc}") from None
    return model.to(device).eval()


__all__ = ["straight_through_gate", "gate_select", "mix_streams", "GatePoint", "GatedNetwork", "build_gated_network",
           "CompiledInterroGate", "count_flops", "count_parameters", "save_compiled", "load_compiled",
           "describe_module", "module_from_description", "prune_output_channels"]
