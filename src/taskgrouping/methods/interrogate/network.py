"""InterroGate's gated network (Bejnordi et al., ICML 2024): ``T + 1`` streams of one backbone run in
lockstep - one shared stream and one per task - with a gate at every layer that produces channels.

:func:`build_gated_network` walks the backbone (``nn.Sequential`` blocks down to their layers) and
turns each weight layer with its channel-local tail, each ResNet ``BasicBlock`` and each ViT
``TransformerBlock`` into a gated layer (:mod:`~taskgrouping.methods.interrogate.gated_layers`);
layers in between that mix channels (``Flatten``, ``LayerNorm``) run ungated on every stream, with a
copy per stream when they have parameters. :meth:`GatedNetwork.compile` gives the static pruned
network (:mod:`~taskgrouping.methods.interrogate.compiled`).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.device import model_device
from taskgrouping.methods.interrogate.compiled import CompiledInterroGate
from taskgrouping.methods.interrogate.gated_layers import (GatedBasicBlock, GatedItem, GatedStreamOp,
                                                            GatedTransformerBlock, GatedUnit)
from taskgrouping.methods.interrogate.gates import GatePoint
from taskgrouping.models.resnet import BasicBlock
from taskgrouping.models.vit import PatchEmbedding, TransformerBlock

__all__ = ["GatedNetwork", "build_gated_network"]

#: Elementwise layers a gated layer may end with (any weight layer).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Identity,
                nn.Dropout)
#: Channel-local layers a convolution may end with (they act on each channel on its own).
_CONV_TAIL = _ELEMENTWISE + (nn.BatchNorm2d, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
#: Channel-local layers a linear layer on (B, C) vectors may end with.
_LINEAR_TAIL = _ELEMENTWISE + (nn.BatchNorm1d,)
#: Layers with parameters that run ungated on every stream (each stream has its own copy).
_STREAM_LAYERS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


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
        for point in self.gate_points().values():
            point.on_cut = self._write_zero_shared_grads

    def _write_zero_shared_grads(self) -> None:
        """After a backward pass in which a gated layer sent its shared stream no gradient (no task read it):
        the zero gradient the gate formula gives every shared-stream parameter that got none, so that the
        optimiser steps them as it would under autograd through the formula (Adam's step count, weight decay).
        """
        for p in self._shared_parameters(self.items[:self.last_gated + 1]):  # the shared stream runs up to there
            if p.grad is None:
                p.grad = torch.zeros_like(p)

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
        return self._shared_parameters(self.items)

    def _shared_parameters(self, items: Iterable[GatedItem]) -> list[nn.Parameter]:
        params = list(self.stem.parameters())
        for item in items:
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

    def compile(self, kept_only: bool = False) -> CompiledInterroGate:
        """The static pruned network with the same eval-mode outputs (module
        :mod:`~taskgrouping.methods.interrogate.compiled`); ``kept_only``: without merged or widened layers,
        the network whose FLOPs InterroGate's paper counts."""
        compiled: list[nn.Module] = []
        need = False  # does the next item read the shared stream? (nothing after the last item does)
        for item in reversed(self.items):
            module, need = item.compile(need)
            compiled.append(module)
        net = CompiledInterroGate(copy.deepcopy(self.stem), compiled[::-1], [copy.deepcopy(h) for h in self.heads],
                                  self.task_names, kept_only)
        return net.to(model_device(self)).train(self.training)


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
    for copied in (shared, *branches):  # a task's φ'_t may be the very tensor another stream reads (gates.py)
        for m in copied.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
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
