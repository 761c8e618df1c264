"""DMTG's network: K group branches (after an optional shared stem), each wired to all N task heads,
and the learnable assignment logits S (N x K) of Gao et al. (ICML 2024).

Gradient scaling: a step trains K branches from one stem and, per branch, N heads, so the paper
scales the gradient into the stem by 1/sqrt(K) and into each branch by 1/sqrt(N) (``intended``); the
authors' code scales both by 1/sqrt(K) (``authors_code``). ``live[k, i]`` marks the heads still
computed: the paper computes all K*N heads every step and names this its limitation, so heads whose
assignment has collapsed are pruned (see :class:`~taskgrouping.methods.dmtg.objective.DMTGObjective`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.dmtg.losses import StackedTargets
from taskgrouping.models.branched import BranchedModel, HeadKey
from taskgrouping.tasks import Task, valid_counts

__all__ = ["DMTGModel", "scale_grad"]

#: index tensors a DMTGModel keeps for its heads' subsets (one per subset and device seen, then cleared)
_MAX_INDICES = 256


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` whose gradient is multiplied by ``scale`` (``x`` itself when the scale is 1)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


class DMTGModel(nn.Module):
    """A K-branch model with all N heads per branch and the learnable assignment logits S (N x K).

    ``live[k, i]`` says whether head (k, i) is still computed; dead heads get zero assignment
    probability. ``forward`` answers with the currently assigned heads (argmax of S over live
    heads), which is what validation scores and what :meth:`pruned` keeps.
    """

    def __init__(self, net: BranchedModel, task_names: list[str], s_init: Tensor, grad_scaling: str = "intended"):
        super().__init__()
        K, N = len(net.branches), len(task_names)
        if tuple(s_init.shape) != (N, K):
            raise ValueError(f"S must be N x K = {N} x {K}, got {tuple(s_init.shape)}")
        if any(g != list(task_names) for g in net.groups):
            raise ValueError("DMTG needs every branch to carry all task heads, in task order")
        self.net = net
        self.task_names = list(task_names)
        self.S = nn.Parameter(s_init.clone().float())
        self.register_buffer("live", torch.ones(K, N, dtype=torch.bool))
        self.register_buffer("low_epochs", torch.zeros(K, N, dtype=torch.long))
        self._indices: dict[tuple, Tensor] = {}  # _index's tensors, by (values, device)
        # One nn.Linear per branch holding every task's linear head ("bank"), so a step's parameter
        # count and kernel launches do not grow with N; per-task heads are written back in pruned().
        heads = [h for hs in net.heads for h in hs]
        self.fused = all(isinstance(h, nn.Linear) for h in heads) and len({h.in_features for h in heads}) == 1
        if self.fused:
            self.out_sizes = [h.out_features for h in net.heads[0]]
            self.offsets = [0]
            for size in self.out_sizes:
                self.offsets.append(self.offsets[-1] + size)
            banks = []
            for hs in net.heads:
                bank = nn.Linear(hs[0].in_features, self.offsets[-1])
                with torch.no_grad():
                    bank.weight.copy_(torch.cat([h.weight for h in hs]))
                    bank.bias.copy_(torch.cat([h.bias for h in hs]))
                banks.append(bank)
                for h in hs:
                    h.requires_grad_(False)
            self.banks = nn.ModuleList(banks)
        has_stem = not isinstance(net.stem, nn.Identity)
        self.branch_scale = 1 / math.sqrt(K) if grad_scaling != "none" and has_stem else 1.0
        self.head_scale = {"none": 1.0, "intended": 1 / math.sqrt(N), "authors_code": 1 / math.sqrt(K)}[grad_scaling]

    @property
    def K(self) -> int:
        return len(self.net.branches)

    def masked_logits(self) -> Tensor:
        return self.S.masked_fill(~self.live.T, float("-inf"))

    def probabilities(self) -> Tensor:
        """softmax(S) over groups, restricted to live heads (N x K)."""
        return torch.softmax(self.masked_logits(), dim=1)

    def assignment(self) -> list[int]:
        return self.masked_logits().argmax(dim=1).tolist()

    def grouping(self) -> Grouping:
        """Task i -> group argmax_k S_ik; empty groups dropped (indices renumbered in order)."""
        assign = self.assignment()
        groups = [[t for t, k in zip(self.task_names, assign) if k == g] for g in range(self.K)]
        return Grouping.partition(groups, method="dmtg")

    def live_keys(self) -> list[HeadKey]:
        return [(k, t) for k in range(self.K) for i, t in enumerate(self.task_names) if self.live[k, i]]

    def forward_heads(self, x: Tensor, keys: list[HeadKey] | None = None) -> tuple[dict[HeadKey, Tensor], dict]:
        """Predictions of the given heads (default: live ones) with DMTG's gradient scaling."""
        keys = self.live_keys() if keys is None else keys
        z = self.net.stem(x)
        preds = {}
        index = {t: i for i, t in enumerate(self.task_names)}
        feats = self.net.branch_features(scale_grad(z, self.branch_scale), {k for k, _ in keys})
        for k, f in feats.items():
            fh = scale_grad(f, self.head_scale)
            for kk, t in keys:
                if kk == k:
                    i = index[t]
                    if self.fused:  # per-task rows of the bank: bit-identical to the pruned model's heads
                        rows = slice(self.offsets[i], self.offsets[i + 1])
                        preds[(k, t)] = F.linear(fh, self.banks[k].weight[rows], self.banks[k].bias[rows])
                    else:
                        preds[(k, t)] = self.net.heads[k][i](fh)
        return preds, feats

    def head_losses(self, x: Tensor, targets: dict[str, Tensor], tasks: list[Task],
                    probe: bool = False) -> tuple[Tensor, dict]:
        """The N x K matrix of live heads' batch losses L_ik (0 for dead heads and for tasks without a
        label in the batch, whose heads are not run) and the branch features.

        Each branch's linear heads run as one matrix product and same-kind scalar tasks share one
        vectorised loss (:func:`stacked_losses`); this keeps a step's cost nearly flat in N.
        ``probe``: heads not assigned by argmax S see their branch's features detached, so only the
        assigned heads' losses reach the branches (and stem).
        """
        assign = self.assignment() if probe else None
        z = self.net.stem(x)
        N = len(self.task_names)
        loss = torch.zeros(N, self.K, device=x.device)
        stacked = StackedTargets(tasks, targets)
        # heads of tasks without a label in the batch are not run (their losses stay 0, as masked ones would)
        labelled = valid_counts(tasks, targets).to(self.live.device) > 0
        # one read of the K x N mask (on CUDA one synchronisation a step, not one per branch)
        run = {k: idx for k, row in enumerate((self.live & labelled).tolist())
               if (idx := [i for i, on in enumerate(row) if on])}
        zs = scale_grad(z, self.branch_scale)
        ks, idxs = list(run), list(run.values())
        task_list = [tasks[i] for i in idxs[0]] if idxs else []
        if (assign is None and self.fused and len(ks) > 1 and all(idx == idxs[0] for idx in idxs)
                and stacked.batched(task_list)
                and (stacked_feats := self.net.stacked_branch_features(zs, ks)) is not None):
            return self._batched_losses(loss, stacked_feats, ks, idxs[0], stacked, task_list), \
                dict(zip(ks, stacked_feats.unbind(0)))
        feats = self.net.branch_features(zs, run)
        for k, idx in run.items():
            fh = scale_grad(feats[k], self.head_scale)
            probes = set() if assign is None else {j for j, i in enumerate(idx) if assign[i] != k}
            preds = self._head_preds(k, fh, idx, probes)
            col = stacked.losses([tasks[i] for i in idx], preds, idx)
            loss = loss.index_put((self._index(idx, x.device), self._index([k] * len(idx), x.device)), col)
        return loss, feats

    def _batched_losses(self, loss: Tensor, feats: Tensor, ks: list[int], idx: list[int], stacked: StackedTargets,
                        task_list: list[Task]) -> Tensor:
        """``loss`` with the heads ``idx`` of branches ``ks`` filled in, from their stacked features (len(ks) x
        B x F): every branch's bank as one batched matrix product and one loss call per task kind (branches
        stacked, every branch running the same heads, no probes)."""
        fh = scale_grad(feats, self.head_scale)
        weight = torch.stack([self.banks[k].weight for k in ks])
        bias = torch.stack([self.banks[k].bias for k in ks])
        offsets = [0]
        if len(idx) < len(self.task_names):
            rows = self._index([r for i in idx for r in range(self.offsets[i], self.offsets[i + 1])], weight.device)
            weight, bias = weight[:, rows], bias[:, rows]
        for i in idx:
            offsets.append(offsets[-1] + self.out_sizes[i])
        outputs = torch.baddbmm(bias.unsqueeze(1), fh, weight.transpose(1, 2))
        vals = stacked.branch_losses(task_list, outputs, offsets, idx)  # len(ks) x len(idx)
        device = loss.device
        rows_i = self._index(idx, device).unsqueeze(1).expand(len(idx), len(ks))
        cols_k = self._index(ks, device).unsqueeze(0).expand(len(idx), len(ks))
        return loss.index_put((rows_i, cols_k), vals.t())

    def _index(self, values: list[int], device: torch.device) -> Tensor:
        """``values`` as an index tensor on ``device``, made once (no host-to-device copy every step; at most
        :data:`_MAX_INDICES` kept)."""
        key = (tuple(values), device)
        if key not in self._indices:
            if len(self._indices) >= _MAX_INDICES:  # labels missing at random make new subsets every batch
                self._indices.clear()
            self._indices[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._indices[key]

    def _head_preds(self, k: int, f: Tensor, idx: list[int], probes: set[int] = frozenset()) -> list[Tensor]:
        """Predictions of branch ``k``'s heads ``idx`` on its features ``f``; the heads at positions ``probes``
        see ``f`` detached (their losses train the head, not the branch)."""
        if not self.fused:  # every branch holds all heads in task order
            return [self.net.heads[k][i](f.detach() if j in probes else f) for j, i in enumerate(idx)]
        weight, bias = self.banks[k].weight, self.banks[k].bias
        if len(idx) < len(self.task_names):
            rows = self._index([r for i in idx for r in range(self.offsets[i], self.offsets[i + 1])], weight.device)
            weight, bias = weight[rows], bias[rows]
        sizes = [self.out_sizes[i] for i in idx]
        preds = list(F.linear(f, weight, bias).split(sizes, dim=1))
        if probes:
            detached = F.linear(f.detach(), weight, bias).split(sizes, dim=1)
            for j in probes:
                preds[j] = detached[j]
        return preds

    def branch_losses(self, k: int, f: Tensor, targets: dict[str, Tensor],
                      tasks: list[Task]) -> tuple[list[int], Tensor]:
        """(live task indices, their losses) of branch ``k``'s heads on its features ``f``, every head
        attached to ``f`` (also those that :meth:`head_losses` runs as probes)."""
        idx = self.live[k].nonzero().flatten().tolist()
        return idx, StackedTargets(tasks, targets).losses([tasks[i] for i in idx], self._head_preds(k, f, idx), idx)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        assign = self.assignment()
        preds, _ = self.forward_heads(x, [(k, t) for t, k in zip(self.task_names, assign)])
        return {t: preds[(k, t)] for t, k in zip(self.task_names, assign)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.net.shared_parameters()

    @torch.no_grad()
    def _sync_heads(self) -> None:
        """Write the fused banks back into the per-task head modules."""
        if not self.fused:
            return
        for k, bank in enumerate(self.banks):
            for i, head in enumerate(self.net.heads[k]):
                head.weight.copy_(bank.weight[self.offsets[i]:self.offsets[i + 1]])
                head.bias.copy_(bank.bias[self.offsets[i]:self.offsets[i + 1]])

    def pruned(self) -> BranchedModel:
        """The one-shot result: N heads (the assigned ones), empty branches dropped."""
        self._sync_heads()
        assign = self.assignment()
        net = BranchedModel(self.net.stem, list(self.net.branches),
                            [{t: self.net.head(k, t) for t in self.net.groups[k]} for k in range(self.K)],
                            {t: k for t, k in zip(self.task_names, assign)})
        if self.net.spec is not None:
            net.spec = dict(self.net.spec, serves=net.serves)
        out = net.prune()
        for p in out.parameters():
            p.requires_grad_(True)
        return out
