"""InterroGate's compiled network (Bejnordi et al., ICML 2024): the static, pruned network
left once the gates are fixed.

Task ``t``'s copy of a gated layer only needs the channels with ``G_t = 1`` and the shared copy only
the channels some task reads (``G_t = 0`` for some ``t``); the rest are pruned
(:mod:`~taskgrouping.methods.interrogate.pruning`). Each gated layer's :class:`GateAssembly`
re-assembles every task's ``φ'_t = G_t ⊙ φ_t + (1 − G_t) ⊙ ψ`` by indexing, so the compiled network's
outputs equal the gated network's in eval mode. It is built from ``torch.nn`` layers and this
package's modules only, so :mod:`~taskgrouping.methods.interrogate.serialization` can save and
rebuild it without the gated network or the backbone builders.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.methods.interrogate.gates import mix_streams
from taskgrouping.methods.interrogate.pruning import prune_norm, prune_output_channels, prune_weight_layer
from taskgrouping.models.resnet import BasicBlock, ZeroPadShortcut

__all__ = ["TRANSFORMER_ROLES", "role_key", "multi_head_attention", "GateAssembly", "CompiledUnit",
           "CompiledStreamOp", "ResidualOutput", "residual_output", "CompiledBasicBlock", "CompiledTransformerBlock",
           "CompiledInterroGate"]

#: The gated linears of a transformer block, in the order they run (module paths in the block).
TRANSFORMER_ROLES = ("attn.q", "attn.k", "attn.v", "attn.out", "ffn.fc1", "ffn.fc2")


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
