"""InterroGate's compiled network (Bejnordi et al., ICML 2024): the static, pruned network
left once the gates are fixed.

Task ``t``'s copy of a gated layer only needs the channels with ``G_t = 1`` and the shared copy only
the channels some task reads (``G_t = 0`` for some ``t``); the rest are pruned
(:mod:`~taskgrouping.methods.interrogate.pruning`). Each gated layer's :class:`GateAssembly`
re-assembles every task's ``φ'_t = G_t ⊙ φ_t + (1 − G_t) ⊙ ψ`` by indexing, so the compiled network's
outputs equal the gated network's in eval mode. It is built from ``torch.nn`` layers and this
package's modules only, so :mod:`~taskgrouping.methods.interrogate.serialization` can save and
rebuild it without the gated network or the backbone builders.

How it runs (:class:`CompiledInterroGate`): a task stream needs the shared stream only where it reads
shared channels, and the shared stream needs the task streams only through its β mixture. So each task
runs ahead, one task at a time, as far as it can without the shared stream (its own copy of the next
gated layer, the layers between, and everything after the shared stream's last use, heads included),
and the mixture is accumulated task by task. Where no shared channel is read this is exactly the
single-task networks' depth-first order; elsewhere it keeps one task's activations in cache at a time
instead of every task's at every layer. The first gated layer, where every stream reads the same
input, runs per task at full width with the shared rows swapped in (:class:`MergedUnit`) when that
moves less memory than slicing it (:func:`merge_pays`), and the other pruned copies are widened to a
multiple of :data:`ALIGN` channels (:func:`align_unit`), widths the CPU kernels run fast. Outputs
equal the gated network's up to float rounding where a wider or merged matrix product sums in another
order (the mixture sums in the gated network's order, bit for bit); FLOPs count what runs, so the merged
layer and the widening add to the kept channels' count (``compile(kept_only=True)`` builds the network
of the kept channels alone).
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.methods.interrogate.gates import Mixture, mix_streams
from taskgrouping.methods.interrogate.pruning import (can_concat_output_channels, concat_output_channels,
                                                      pad_output_channels, prune_norm, prune_output_channels,
                                                      prune_weight_layer)
from taskgrouping.models.resnet import BasicBlock, ZeroPadShortcut
from taskgrouping.models.vit import PatchEmbedding

__all__ = ["TRANSFORMER_ROLES", "role_key", "multi_head_attention", "GateAssembly", "CompiledUnit",
           "MergedUnit", "MEMORY_COST", "ALIGN", "merge_pays", "merge_first_unit", "align_unit",
           "CompiledStreamOp", "ResidualOutput", "residual_output", "CompiledBasicBlock", "CompiledTransformerBlock",
           "CompiledInterroGate"]

#: The gated linears of a transformer block, in the order they run (module paths in the block).
TRANSFORMER_ROLES = ("attn.q", "attn.k", "attn.v", "attn.out", "ffn.fc1", "ffn.fc2")


class GateAssembly(nn.Module):
    """Re-assembles every task's ``φ'_t`` of one gated layer from the channels the compiled
    network computes: task ``t``'s own part (its kept channels, plus zero channels where
    :func:`align_unit` widened it) followed by the shared part, gathered by the fixed index
    ``index_t``. Also mixes the shared stream's next input when it is needed.

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

    def assemble(self, t: int, shared_part: Tensor | None, own_part: Tensor | None) -> Tensor:
        """Task ``t``'s ``φ'_t`` from its kept own channels and the shared kept channels. A task that
        reads only one of them in channel order gets that tensor itself (no copy)."""
        parts = []
        if self.n_own[t]:
            parts.append(own_part)
        if self.uses_shared[t]:
            parts.append(shared_part)
        full = parts[0] if len(parts) == 1 else torch.cat(parts, self.channel_dim)
        return full.index_select(self.channel_dim, getattr(self, f"index_{t}")) if self.gather[t] else full

    def forward(self, shared_part: Tensor | None, own_parts: Sequence[Tensor | None]) -> list[Tensor]:
        return [self.assemble(t, shared_part, own_parts[t]) for t in range(self.n_tasks)]

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

    def own(self, t: int, x: Tensor) -> Tensor | None:
        """Task ``t``'s kept own channels (needs nothing from the shared stream)."""
        return self.tasks[t](x) if self.has_own[t] else None

    def shared_part(self, shared: Tensor | None) -> Tensor | None:
        return self.shared(shared) if self.has_shared else None

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        sp = self.shared_part(shared)
        out = self.assembly(sp, [self.own(t, x) for t, x in enumerate(tasks)])
        return (self.assembly.mix_streams(out) if self.assembly.mixture else None), out


#: Multiply-adds that cost as much as moving one float through memory once (a read or a write) on
#: one CPU core; measured on the AVX-512 CPU these choices were tuned on (a 16 -> 32 channel 3x3
#: convolution runs ~45 G multiply-adds/s, a copy of a feature map moves ~10 G floats/s).
MEMORY_COST = 4.0


def _macs_per_output(layer: nn.Module) -> int:
    """Multiply-adds per output element of a weight layer."""
    if isinstance(layer, PatchEmbedding):
        layer = layer.proj
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features
    raise TypeError(f"not a weight layer: {type(layer).__name__}")


def merge_pays(unit: CompiledUnit) -> bool:
    """Whether a gated layer whose streams all read the same input runs faster merged
    (:class:`MergedUnit`). A deterministic cost per output position, in multiply-adds: the sliced form
    computes the kept channels once (``n_shared + Σ n_own`` outputs) and then copies them into each
    task's ``φ'_t`` (a concatenation and a gather); the merged form computes ``T × C`` outputs and
    copies nothing. Layers with few multiply-adds per output (a first convolution on raw pixels)
    are bound by those copies and merge; wide ones (a patch embedding, a linear layer on many
    features) keep the fewer multiply-adds of the sliced form."""
    asm = unit.assembly
    first = next(iter(unit.shared.children())) if unit.has_shared else None
    if first is None:
        return False
    per_output = _macs_per_output(first) + MEMORY_COST  # compute + write one output element
    channels = len(getattr(asm, "index_0"))
    kept = asm.n_shared + sum(asm.n_own)
    copies = 0
    for t in range(asm.n_tasks):
        if asm.gather[t]:
            both = asm.n_own[t] > 0 and asm.uses_shared[t]
            copies += 2 * channels + (2 * (asm.n_own[t] + asm.n_shared) if both else 0)
    sliced = per_output * kept + MEMORY_COST * copies
    merged = per_output * asm.n_tasks * channels
    return merged <= sliced


class MergedUnit(nn.Module):
    """A gated layer whose streams all read the same input (the first gated layer), run as one
    full-width layer per task: ``tasks[t]`` computes channel ``c`` with task ``t``'s own weights where
    ``G_t = 1`` and the shared stream's elsewhere, so its output is ``φ'_t`` itself - the single-task
    network's layer with some rows swapped. No shared copy runs and nothing is gathered, at the price
    of computing a shared channel once per task that reads it (see :func:`merge_pays`). Build it with
    :meth:`from_unit`."""

    def __init__(self, assembly: GateAssembly, tasks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.assembly = assembly
        self.tasks = nn.ModuleList(tasks)

    @classmethod
    def from_unit(cls, unit: CompiledUnit) -> "MergedUnit":
        """The merged equivalent of ``unit`` (whose streams must all read the same input)."""
        asm = unit.assembly
        merged = []
        for t, own in enumerate(unit.tasks):
            parts = ([own] if asm.n_own[t] else []) + ([unit.shared] if asm.uses_shared[t] else [])
            rows = parts[0] if len(parts) == 1 else concat_output_channels(parts)
            merged.append(prune_output_channels(rows, getattr(asm, f"index_{t}")) if asm.gather[t]
                          else copy.deepcopy(rows))
        return cls(asm, merged)

    def task(self, t: int, x: Tensor) -> Tensor:
        return self.tasks[t](x)

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        out = [self.task(t, x) for t, x in enumerate(tasks)]
        return (self.assembly.mix_streams(out) if self.assembly.mixture else None), out


def merge_first_unit(items: Sequence[nn.Module]) -> list[nn.Module]:
    """``items`` with the first gated layer replaced by its :class:`MergedUnit` where every stream reads
    the same input there (only parameter-free ungated layers before it), it reads the shared stream
    and :func:`merge_pays`."""
    out = list(items)
    for i, item in enumerate(out):
        if isinstance(item, CompiledStreamOp) and not item.per_stream and item.has_shared:
            continue
        if isinstance(item, CompiledUnit) and item.has_shared:
            copies = [item.shared] + [m for m, h in zip(item.tasks, item.has_own) if h]
            if can_concat_output_channels(list(copies)) and merge_pays(item):
                out[i] = MergedUnit.from_unit(item)
        break
    return out


#: Pruned copies of a gated layer are widened to a multiple of this many output channels (at most
#: the layer's width): CPU kernels (oneDNN convolutions, MKL matrix products) are markedly slower on
#: other widths - a linear layer 1568 -> 31 takes twice as long as 1568 -> 32 - while the STL
#: networks' widths are aligned already. The appended channels are zero and dropped by the gather
#: that assembles ``φ'_t``.
ALIGN = 8


def _aligned(width: int, channels: int) -> int:
    return min(-(-width // ALIGN) * ALIGN, channels)


def _width(ops: nn.Module) -> int:
    """Output channels of a copy (weight layer + tail)."""
    first = ops[0]
    return first.proj.out_channels if isinstance(first, PatchEmbedding) else first.weight.shape[0]


def align_unit(unit: CompiledUnit) -> CompiledUnit:
    """Widen ``unit``'s pruned copies to a multiple of :data:`ALIGN` channels (in place; again is a
    no-op) and point its assembly's gathers past the appended zero channels. Outputs are unchanged up
    to float rounding (:func:`~taskgrouping.methods.interrogate.pruning.pad_output_channels`)."""
    asm = unit.assembly
    channels = len(getattr(asm, "index_0"))
    if unit.has_shared and _width(unit.shared) < _aligned(asm.n_shared, channels):
        unit.shared = pad_output_channels(unit.shared, _aligned(asm.n_shared, channels))
    for t in range(asm.n_tasks):
        if not unit.has_own[t]:
            continue
        width, target = _width(unit.tasks[t]), _aligned(asm.n_own[t], channels)
        if width >= target:
            continue
        unit.tasks[t] = pad_output_channels(unit.tasks[t], target)
        index = getattr(asm, f"index_{t}")  # positions in (own part, shared part): shift the shared ones
        setattr(asm, f"index_{t}", torch.where(index < width, index, index - width + target))
        asm.gather[t] = True
    return unit


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

    def task(self, t: int, x: Tensor) -> Tensor:
        return self.tasks[t if self.per_stream else 0](x)

    def forward(self, shared: Tensor | None, tasks: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        return (self.shared(shared) if self.has_shared else None), [self.task(t, x) for t, x in enumerate(tasks)]


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


def residual_output(block: BasicBlock, keep: Tensor) -> ResidualOutput:
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


def role_key(role: str) -> str:
    return role.replace(".", "_")


class CompiledTransformerBlock(nn.Module):
    """A pruned gated pre-norm transformer block. ``shared`` holds only what the shared stream
    still computes (keys ``norm1``, ``attn_q``, ..., ``norm2``, ``ffn_fc2``); ``tasks[t]`` holds
    task ``t``'s norms and the projections with at least one kept channel."""

    def __init__(self, heads: int, assemblies: Mapping[str, GateAssembly], shared: Mapping[str, nn.Module],
                 tasks: Sequence[Mapping[str, nn.Module]]) -> None:
        super().__init__()
        self.heads = int(heads)
        self.assemblies = nn.ModuleDict({role_key(r): assemblies[r] for r in TRANSFORMER_ROLES})
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
    streams; ``heads[i]`` predicts ``task_names[i]``. The first gated layer may become a
    :class:`MergedUnit` (:func:`merge_first_unit`) and the other pruned layers are widened
    (:func:`align_unit`), unless ``kept_only``: then every copy computes exactly its kept channels, the
    network whose FLOPs InterroGate's paper counts (same outputs, slower on CPUs). ``forward`` runs each
    task as far as it can without the shared stream before the next task (module docstring).
    """

    def __init__(self, stem: nn.Module, items: Sequence[nn.Module], heads: Sequence[nn.Module],
                 task_names: Sequence[str], kept_only: bool = False) -> None:
        super().__init__()
        self.stem = stem
        if not kept_only:
            items = [align_unit(i) if isinstance(i, CompiledUnit) else i for i in merge_first_unit(items)]
        self.items = nn.ModuleList(items)
        self.heads = nn.ModuleList(heads)
        self.task_names = list(task_names)

    @staticmethod
    def _advance(items: list[nn.Module], head: nn.Module, t: int, x: Tensor, start: int,
                 mixes: dict[int, Mixture]) -> tuple[int, str, Tensor | None]:
        """Run task ``t`` from ``items[start]`` on ``x`` until it needs the shared stream. Returns the
        item it stopped at and what it holds there: ``"own"`` (that gated layer's own part),
        ``"input"`` (the item's input) or ``"out"`` (past the last item: ``head``'s prediction).
        Mixtures of gated layers passed on the way are accumulated in ``mixes``."""
        for k in range(start, len(items)):
            item = items[k]
            if isinstance(item, CompiledStreamOp):
                x = item.task(t, x)
                continue
            if isinstance(item, MergedUnit):
                x = item.task(t, x)
            elif isinstance(item, CompiledUnit):
                own = item.own(t, x)
                if item.has_shared:
                    return k, "own", own
                x = item.assembly.assemble(t, None, own)
            else:
                return k, "input", x
            asm = item.assembly
            if asm.mixture:
                mixes.setdefault(k, Mixture(asm.mix, asm.channel_dim)).add(t, x)
        return len(items), "out", head(x)

    @staticmethod
    def _shared_input(items: list[nn.Module], stop: int, source: tuple[int, Tensor | None]) -> Tensor | None:
        """The shared stream at ``items[stop]``: ``source`` (item index, its shared output) carried
        through the ungated layers in between."""
        k, s = source
        for item in items[k + 1:stop]:
            s = item.shared(s) if isinstance(item, CompiledStreamOp) and item.has_shared and s is not None else None
        return s

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.stem(x)
        items, heads = list(self.items), list(self.heads)
        n_tasks = len(self.task_names)
        mixes: dict[int, Mixture] = {}
        runs = [self._advance(items, heads[t], t, z, 0, mixes) for t in range(n_tasks)]
        stop, kind = runs[0][0], runs[0][1]  # every task stops at the same item
        values = [v for _, _, v in runs]
        source: tuple[int, Tensor | None] = (-1, z)  # the latest shared-stream output and its item
        while kind != "out":
            if mixes:
                last = max(mixes)
                source = (last, mixes[last].result())
            item = items[stop]
            shared = self._shared_input(items, stop, source)
            shared_part: Tensor | None = None
            outputs: list[Tensor] | None = None
            if kind == "own":  # a gated layer: its shared part once, then each task's φ'_t
                shared_part = item.shared_part(shared)
                mixes = {stop: Mixture(item.assembly.mix, item.assembly.channel_dim)} if item.assembly.mixture else {}
                source = (stop, None)
            else:  # a gated block run whole, on every task's input at once
                shared_out, outputs = item(shared, values)
                mixes, source = {}, (stop, shared_out)
            runs = []
            for t in range(n_tasks):
                f = item.assembly.assemble(t, shared_part, values[t]) if outputs is None else outputs[t]
                values[t] = None  # each task's input is freed once used
                if outputs is not None:
                    outputs[t] = None
                if stop in mixes:
                    mixes[stop].add(t, f)
                runs.append(self._advance(items, heads[t], t, f, stop + 1, mixes))
            stop, kind = runs[0][0], runs[0][1]
            values = [v for _, _, v in runs]
        return {name: v for name, v in zip(self.task_names, values)}
