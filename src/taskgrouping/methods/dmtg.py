"""DMTG: one-shot differentiable multi-task grouping (Gao et al., ICML 2024).

K group branches (after an optional shared stem), each wired to all N task heads. An N x K
assignment S, relaxed with Gumbel-softmax, weighs head (k, i)'s loss:

    Z = gumbel_softmax(S, tau)   (one sample per step for the whole batch, over the K groups)
    L = sum_i sum_k Z_ik L_ik    (paper Eq. 4-5)

Weights and S train together; task i's group is argmax_k S_ik, empty groups are dropped, and the
pruned model (N heads) is the result: no retraining. Beyond the paper:

* once all but one of a task's heads have had assignment probability below a threshold for
  ``prune_patience`` epochs (its row of S has converged), the others stop being computed (the paper
  computes all K*N heads every step and names this its limitation); a task still undecided keeps
  every head, so pruning does not end S's learning early;
* ``mates_weight`` (opt-in): a pull of S_i towards the branches whose current tasks' gradients agree
  with task i's (running per-branch gradient cosines), the effect of task i on its branch-mates that
  S's own-loss gradient cannot see (measured recovery rates: benchmarks/results/dmtg_learning*.md);
* a ``robust`` recipe (default): S initialised from a training-free prior, the clustering of the
  tasks' label correlations (:func:`label_affinity`, :func:`cluster_prior`), held fixed for the
  first ``s_warmup_epochs`` while the branches specialise, then learned with its own, faster
  learning rate and several Gumbel samples per step; collapsed heads are pruned. Without a warm
  start the weights start as the grouped model of S's initial assignment would at the same seed
  (:func:`start_from_initial_grouping`), so DMTG and a fixed grouping are compared without
  initialisation luck. With the paper's recipe the found grouping depends on the seed (symmetric
  branches, rich-get-richer dynamics); the evidence for this recipe is in the DMTG issue's closing
  note. While S is held fixed (``warmup="probe"``, default) the branches train exactly as the
  initial grouping would: each branch learns only from the heads S assigns to it, the other heads
  fit their readouts on detached branch features (linear probes), and the head losses are weighed
  by softmax(S / tau), not a Gumbel draw. S learns nothing in the warm-up, so a draw there would
  only add cross-talk between groups (about twice the softmax mass on other groups' heads); the
  probes make L_ik a fair measure of how well branch k serves task i once S starts learning.
  ``warmup="softmax"`` lets every head train its branch, ``warmup="gumbel"`` also draws Z (as the
  paper does in every step). ``recipe=paper`` keeps the paper's text, ``recipe=paper_code`` the
  authors' released configs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.baselines import fit_grouping, naive_mtl_model
from taskgrouping.models.branched import BranchedModel, HeadKey
from taskgrouping.tasks import Task
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.engine.hooks import ObjectiveBase, StepOutput

RECIPES: dict[str, dict[str, Any]] = {
    # The paper's text: branches start from naive-MTL weights copied K times, S uniform, tau constant,
    # one optimiser for weights and S, intended gradient scaling 1/sqrt(K) into branches, 1/sqrt(N) into heads.
    "paper": dict(warm_start=True, init="uniform", tau=2.5, tau_schedule="constant", s_lr=None,
                  grad_scaling="intended", hard=False, samples=1, entropy_weight=0.0, head_pruning=False,
                  s_warmup_epochs=0, warmup="gumbel"),
    # The released configs: no warm start, 1/sqrt(K) applied to branches and heads (their code's bug).
    "paper_code": dict(warm_start=False, init="uniform", tau=2.5, tau_schedule="constant", s_lr=None,
                       grad_scaling="authors_code", hard=False, samples=1, entropy_weight=0.0, head_pruning=False,
                       s_warmup_epochs=0, warmup="gumbel"),
    # Our default (see the module docstring and the closing notes of the DMTG issue for the evidence).
    "robust": dict(warm_start=False, init="auto", tau=1.0, tau_schedule="constant", s_lr=0.05,
                   grad_scaling="intended", hard=False, samples=4, entropy_weight=0.0, head_pruning=True,
                   s_warmup_epochs=3, warmup="probe"),
}
#: how the weights train while S is held fixed (see the module docstring)
WARMUP_MODES = ("probe", "softmax", "gumbel")
OPTIONS: dict[str, Any] = dict(
    recipe="robust", warm_start=None, init=None, prior=None, prior_strength=3.0, init_noise=0.1, tau=None,
    tau_schedule=None, tau_start=10.0, tau_end=0.01, tau_decay=0.9, s_lr=None, grad_scaling=None, hard=None,
    samples=None, entropy_weight=None, head_pruning=None, prune_threshold=0.02, prune_patience=2, warm_epochs=None,
    s_warmup_epochs=None, warmup=None,
    affinity_batches=20, finetune_epochs=0, retrain=[], mates_weight=0.0, mates_every=10, mates_decay=0.9,
)


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """Recipe defaults, then explicit options; validated."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown dmtg option(s) {sorted(unknown)}; expected some of {sorted(OPTIONS)}")
    recipe = options.get("recipe", "robust")
    if recipe not in RECIPES:
        raise ValueError(f"dmtg.recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    out = dict(OPTIONS)
    out.update(RECIPES[recipe])
    out.update({k: v for k, v in options.items() if v is not None})
    if out["tau_schedule"] not in ("constant", "exponential"):
        raise ValueError(f"dmtg.tau_schedule must be 'constant' or 'exponential', got {out['tau_schedule']!r}")
    for key in ("tau", "tau_start", "tau_end"):
        if not float(out[key]) > 0:
            raise ValueError(f"dmtg.{key} must be > 0, got {out[key]!r}")
    if not 0 < float(out["tau_decay"]) <= 1:
        raise ValueError(f"dmtg.tau_decay must be in (0, 1], got {out['tau_decay']!r}")
    if out["init"] not in ("auto", "uniform", "noisy", "prior", "affinity", "labels"):
        raise ValueError(f"dmtg.init must be auto | uniform | noisy | prior | affinity | labels, got {out['init']!r}")
    if out["grad_scaling"] not in ("none", "intended", "authors_code"):
        raise ValueError(f"dmtg.grad_scaling must be none | intended | authors_code, got {out['grad_scaling']!r}")
    if out["warmup"] not in WARMUP_MODES:
        raise ValueError(f"dmtg.warmup must be one of {' | '.join(WARMUP_MODES)}, got {out['warmup']!r}")
    if int(out["samples"]) < 1:
        raise ValueError(f"dmtg.samples must be >= 1, got {out['samples']!r}")
    if not 0 <= float(out["prune_threshold"]) < 1:
        raise ValueError(f"dmtg.prune_threshold must be in [0, 1), got {out['prune_threshold']!r}")
    if not float(out["mates_weight"]) >= 0:
        raise ValueError(f"dmtg.mates_weight must be >= 0, got {out['mates_weight']!r}")
    if int(out["mates_every"]) < 1 or int(out["mates_every"]) != out["mates_every"]:
        raise ValueError(f"dmtg.mates_every must be an integer >= 1, got {out['mates_every']!r}")
    if not 0 <= float(out["mates_decay"]) < 1:
        raise ValueError(f"dmtg.mates_decay must be in [0, 1), got {out['mates_decay']!r}")
    for init in out["retrain"]:
        if init not in ("scratch", "naive_mtl"):
            raise ValueError(f"dmtg.retrain entries must be 'scratch' or 'naive_mtl', got {init!r}")
    return out


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
        feats = {}
        preds = {}
        index = {t: i for i, t in enumerate(self.task_names)}
        for k in sorted({k for k, _ in keys}):
            f = self.net.branches[k](scale_grad(z, self.branch_scale))
            feats[k] = f
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
        """The N x K matrix of live heads' batch losses L_ik (0 for dead heads) and the branch features.

        Each branch's linear heads run as one matrix product and same-kind scalar tasks share one
        vectorised loss (:func:`stacked_losses`); this keeps a step's cost nearly flat in N.
        ``probe``: heads not assigned by argmax S see their branch's features detached, so only the
        assigned heads' losses reach the branches (and stem).
        """
        assign = self.assignment() if probe else None
        z = self.net.stem(x)
        N = len(self.task_names)
        loss = torch.zeros(N, self.K, device=x.device)
        feats = {}
        stacked = StackedTargets(tasks, targets)
        for k in range(self.K):
            idx = self.live[k].nonzero().flatten().tolist()
            if not idx:
                continue
            f = self.net.branches[k](scale_grad(z, self.branch_scale))
            feats[k] = f
            fh = scale_grad(f, self.head_scale)
            probes = set() if assign is None else {j for j, i in enumerate(idx) if assign[i] != k}
            preds = self._head_preds(k, fh, idx, probes)
            col = stacked.losses([tasks[i] for i in idx], preds, idx)
            loss = loss.index_put((torch.tensor(idx, device=x.device), torch.full((len(idx),), k, device=x.device)),
                                  col)
        return loss, feats

    def _head_preds(self, k: int, f: Tensor, idx: list[int], probes: set[int] = frozenset()) -> list[Tensor]:
        """Predictions of branch ``k``'s heads ``idx`` on its features ``f``; the heads at positions ``probes``
        see ``f`` detached (their losses train the head, not the branch)."""
        if not self.fused:  # every branch holds all heads in task order
            return [self.net.heads[k][i](f.detach() if j in probes else f) for j, i in enumerate(idx)]
        weight, bias = self.banks[k].weight, self.banks[k].bias
        if len(idx) < len(self.task_names):
            rows = torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
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


class StackedTargets:
    """One step's targets, stacked per kind of scalar task so that many heads' losses are computed by
    one vectorised call; other kinds fall back to :meth:`Task.loss`. Values equal ``Task.loss``."""

    def __init__(self, tasks: list[Task], targets: dict[str, Tensor]) -> None:
        self.tasks = tasks
        self.targets = targets
        self._cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _kind(task: Task) -> tuple | None:
        if task.kind == "binary":
            return ("binary",)
        if task.kind == "regression" and task.out_channels == 1:
            return ("regression", task.loss_type)
        return None

    def _stack(self, key: tuple, positions: list[int]) -> Tensor:
        ck = (key, tuple(positions))
        if ck not in self._cache:
            cols = [self.targets[self.tasks[i].name].reshape(-1) for i in positions]
            self._cache[ck] = torch.stack(cols, dim=1)
        return self._cache[ck]

    def losses(self, tasks: list[Task], preds: list[Tensor], positions: list[int]) -> Tensor:
        out: list[Tensor | None] = [None] * len(tasks)
        buckets: dict[tuple, list[int]] = {}
        for j, t in enumerate(tasks):
            key = self._kind(t)
            if key is None:
                out[j] = t.loss(preds[j], self.targets[t.name])
            else:
                buckets.setdefault(key, []).append(j)
        for key, js in buckets.items():
            tgt = self._stack(key, [positions[j] for j in js])
            if key[0] == "binary":
                logits = torch.stack([preds[j] for j in js], dim=2).float()  # B x 2 x n
                y = tgt.long()
                valid = y >= 0
                per = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
            else:
                p = torch.cat([preds[j] for j in js], dim=1).float()
                y = tgt.to(p.dtype)
                valid = ~torch.isnan(y)
                diff = p - torch.nan_to_num(y)
                per = diff.abs() if key[1] == "l1" else diff.square()
            per = torch.where(valid, per, torch.zeros_like(per))
            vals = per.sum(0) / valid.sum(0).clamp_min(1).to(per.dtype)
            for n, j in enumerate(js):
                out[j] = vals[n]
        return torch.stack(out)  # type: ignore[arg-type]


class DMTGObjective(ObjectiveBase):
    """Per-step loss of DMTG (Eq. 5): each task's loss is sum_k Z_ik L_ik with Z ~ Gumbel-softmax(S, tau).

    ``samples > 1`` averages that over several Gumbel draws of the same step (heads are computed
    once; only the weights change), which lowers the variance of S's gradient at no extra forward cost.
    """

    def __init__(self, tasks: list[Task], opts: dict[str, Any]) -> None:
        self.tasks = {t.name: t for t in tasks}
        self.opts = opts
        self.tau = self.tau_at(0)
        self.warming_up = int(opts["s_warmup_epochs"]) > 0
        self.mates: Tensor | None = None  # K x N x N running cosines of the tasks' gradients on each branch
        self.calls = self.measured = 0

    def state_dict(self) -> dict[str, Any]:
        return {"mates": None if self.mates is None else self.mates.tolist(), "calls": self.calls,
                "measured": self.measured}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mates = None if state.get("mates") is None else torch.tensor(state["mates"])
        self.calls, self.measured = int(state.get("calls", 0)), int(state.get("measured", 0))

    def measure_mates(self, model: DMTGModel, feats: dict[int, Tensor], targets: dict[str, Tensor]) -> None:
        """Update the running cosine between every two tasks' gradients w.r.t. each branch's parameters
        (Mao et al.'s gradient direction similarity, per branch): how much training task i on branch k
        moves it the way branch k's other tasks need. Measured in the warm-up too (probes included), so
        that the estimate has settled when S starts to learn."""
        K, N = model.K, len(model.task_names)
        if self.mates is None:
            self.mates = torch.zeros(K, N, N)
        self.measured += 1
        decay = min(float(self.opts["mates_decay"]), 1 - 1 / self.measured)  # a plain mean until 1/(1-decay)
        tasks = [self.tasks[t] for t in model.task_names]
        for k, f in feats.items():
            params = [p for p in model.net.branches[k].parameters() if p.requires_grad]
            idx, losses = model.branch_losses(k, f, targets, tasks)
            if len(idx) < 2 or not params:
                continue
            rows = []
            for n in range(len(idx)):
                g = torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                       for gi, p in zip(g, params)]))
            G = F.normalize(torch.stack(rows).detach().float(), dim=1).cpu()
            sel = torch.tensor(idx)
            block = self.mates[k][sel[:, None], sel[None, :]]
            self.mates[k][sel[:, None], sel[None, :]] = decay * block + (1 - decay) * (G @ G.T)

    def mates_loss(self, model: DMTGModel) -> Tensor | None:
        """-weight * sum_ik p_ik A_ik with A_ik = sum_{j != i} p_jk cos_k(i, j) (A and p_jk held fixed): its
        gradient moves S_i towards the branches whose current tasks' gradients agree with task i's."""
        if self.mates is None or not float(self.opts["mates_weight"]):
            return None
        p = model.probabilities()  # N x K
        mates = self.mates.to(p.device) * (1 - torch.eye(p.shape[0], device=p.device))  # K x N x N, no self term
        pull = torch.einsum("kij,jk->ik", mates, p.detach())
        return -float(self.opts["mates_weight"]) * (p * pull).sum()

    def tau_at(self, epoch: int) -> float:
        o = self.opts
        if o["tau_schedule"] == "constant":
            return float(o["tau"])
        return max(float(o["tau_end"]), float(o["tau_start"]) * float(o["tau_decay"]) ** epoch)

    def param_groups(self, model: DMTGModel) -> list[dict[str, Any]]:
        weights = [p for n, p in model.named_parameters() if n != "S" and p.requires_grad]
        s_group: dict[str, Any] = {"params": [model.S], "weight_decay": 0.0}
        if self.opts["s_lr"] is not None:
            s_group["lr"] = float(self.opts["s_lr"])
        return [{"params": weights}, s_group]

    def on_epoch_start(self, epoch: int, model: DMTGModel) -> None:
        self.tau = self.tau_at(epoch)
        # S stays fixed while the branches first specialise under the initial assignment
        self.warming_up = epoch < int(self.opts["s_warmup_epochs"])
        model.S.requires_grad_(not self.warming_up)

    def __call__(self, model: DMTGModel, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        names = model.task_names
        mode = self.opts["warmup"] if self.warming_up else "gumbel"
        head_loss, feats = model.head_losses(x, targets, [self.tasks[t] for t in names], probe=mode == "probe")
        logits = model.masked_logits()
        if mode != "gumbel":
            per_task = (F.softmax(logits / self.tau, dim=1) * head_loss).sum(dim=1)
        else:
            z = torch.zeros_like(logits)
            for _ in range(int(self.opts["samples"])):
                z = z + F.gumbel_softmax(logits, tau=self.tau, hard=bool(self.opts["hard"]), dim=1)
            z = z / int(self.opts["samples"])
            per_task = (z * head_loss).sum(dim=1)
        extra = None
        if self.opts["entropy_weight"]:
            p = model.probabilities()
            ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1).mean()
            extra = float(self.opts["entropy_weight"]) * ent
        if float(self.opts["mates_weight"]) and torch.is_grad_enabled():
            if self.calls % int(self.opts["mates_every"]) == 0:
                self.measure_mates(model, feats, targets)
            self.calls += 1
            pull = None if self.warming_up else self.mates_loss(model)
            if pull is not None:
                extra = pull if extra is None else extra + pull
        return StepOutput({t: per_task[i] for i, t in enumerate(names)}, feats, extra)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, model: DMTGModel) -> dict[str, Any]:
        if self.opts["head_pruning"] and epoch >= int(self.opts["s_warmup_epochs"]):
            p = model.probabilities().T  # K x N
            low = (p < float(self.opts["prune_threshold"])) & model.live
            model.low_epochs.copy_(torch.where(low, model.low_epochs + 1, torch.zeros_like(model.low_epochs)))
            # a task's other heads go together, once every one of them has stayed below the threshold for
            # prune_patience epochs: S's row has converged, so pruning ends no learning that is still going on
            keep = torch.zeros_like(low)
            keep[torch.tensor(model.assignment()), torch.arange(len(model.task_names))] = True
            settled = ((model.low_epochs >= int(self.opts["prune_patience"])) | keep | ~model.live).all(dim=0)
            model.live &= keep | ~settled
        return {"tau": self.tau, "assignment_probs": model.probabilities().tolist(),
                "live_heads": int(model.live.sum()), "grouping": model.grouping().as_lists()}


@torch.no_grad()
def affinity_prior(model: BranchedModel, loader, tasks: list[Task], batches: int) -> np.ndarray:
    """Mean over ``batches`` training batches of the cosine similarity between tasks' gradients w.r.t.
    the shared parameters of a (naive-MTL) model: a cheap inter-task affinity (Mao et al.'s GDS
    matrix; cf. TAG's lookahead affinity), used to initialise S."""
    from taskgrouping.diagnostics import gradient_direction_matrix, task_gradients

    names = [t.name for t in tasks]
    by_name = {t.name: t for t in tasks}
    shared = model.shared_parameters()
    total = np.zeros((len(names), len(names)))
    n = 0
    for x, targets in loader:
        with torch.enable_grad():
            preds = model(x)
            losses = {t: by_name[t].loss(preds[t], targets[t]) for t in names}
            g = task_gradients(losses, shared, retain_graph=True)
        m = np.nan_to_num(gradient_direction_matrix(g).cpu().numpy())
        total += m
        n += 1
        if n >= batches:
            break
    return total / max(n, 1)


def label_affinity(loader, tasks: list[Task], batches: int | None = None) -> np.ndarray:
    """|Pearson correlation| between tasks' training labels (pairwise over the values labelled for both).

    A training-free affinity for scalar tasks (binary / regression) or per-pixel regression tasks
    (``dense_regression``, correlated over samples and pixels): related tasks, e.g. CelebA's hair
    colours or one MultiMNIST digit's properties, often have dependent labels.
    """
    kinds = {t.kind for t in tasks}
    if not (kinds <= {"binary", "regression"} or kinds == {"dense_regression"}):
        bad = [t.name for t in tasks if t.kind not in ("binary", "regression")]
        raise ValueError(f"label correlations need binary / regression tasks or only dense_regression ones; "
                         f"{bad} do not fit (use dmtg.init=affinity)")
    dense = kinds == {"dense_regression"}
    cols: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    for b, (_, targets) in enumerate(loader):
        for t in tasks:
            flat = targets[t.name].reshape(targets[t.name].shape[0], -1)
            y = (flat if dense else flat[:, 0]).reshape(-1).double()
            cols[t.name].append(torch.where(y < 0, float("nan"), y) if t.kind == "binary" else y)
        if batches is not None and b + 1 >= batches:
            break
    if dense and len({sum(c.numel() for c in cols[t.name]) for t in tasks}) > 1:
        raise ValueError("label correlations of dense tasks need targets of one size; "
                         f"{[t.name for t in tasks]} differ")
    Y = torch.stack([torch.cat(cols[t.name]) for t in tasks]).numpy()
    n = len(tasks)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            ok = ~np.isnan(Y[i]) & ~np.isnan(Y[j])
            a, b2 = Y[i, ok], Y[j, ok]
            c = np.corrcoef(a, b2)[0, 1] if ok.sum() > 2 and a.std() > 0 and b2.std() > 0 else 0.0
            out[i, j] = out[j, i] = abs(c)
    return out


def cluster_prior(affinity: np.ndarray, K: int, strength: float) -> Tensor:
    """S initialisation from an affinity matrix: average-linkage clustering into K clusters (distance
    1 - affinity), S_ik = strength for task i's cluster k, 0 elsewhere."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = affinity.shape[0]
    s = torch.zeros(n, K)
    if n == 1 or K == 1:
        s[:, 0] = strength
        return s
    sym = (affinity + affinity.T) / 2
    dist = np.clip(1.0 - sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"), t=K, criterion="maxclust")
    order = {c: k for k, c in enumerate(dict.fromkeys(labels.tolist()))}  # clusters numbered by first task
    for i, c in enumerate(labels):
        s[i, order[c]] = strength
    return s


def initial_s(ctx: MethodContext, opts: dict[str, Any], warm: BranchedModel | None) -> tuple[Tensor, Any]:
    N, K = len(ctx.data.tasks), ctx.K
    init = opts["init"]
    if init == "auto":  # the label prior where it is defined, else a small random symmetry breaker
        init = "labels" if all(t.kind in ("binary", "regression") for t in ctx.data.tasks) else "noisy"
        opts["init_used"] = init
    if init == "uniform":
        return torch.zeros(N, K), None
    if init == "noisy":
        g = torch.Generator().manual_seed(ctx.seed)
        return float(opts["init_noise"]) * torch.randn(N, K, generator=g), None
    if init == "prior":
        prior = opts["prior"]
        if prior is None:
            raise ValueError("dmtg.init=prior needs dmtg.prior, an N x K matrix of initial logits")
        s = torch.as_tensor(prior, dtype=torch.float32)
        if tuple(s.shape) != (N, K):
            raise ValueError(f"dmtg.prior must be N x K = {N} x {K} (tasks x groups), got shape {tuple(s.shape)}")
        return s, None
    if init == "labels":
        aff = label_affinity(ctx.loaders()[0], ctx.data.tasks)
        return cluster_prior(aff, K, float(opts["prior_strength"])), aff
    if warm is None:
        raise ValueError("dmtg.init=affinity estimates affinity on the warm-start model; set dmtg.warm_start=true")
    loader = ctx.loaders()[0]
    torch.manual_seed(ctx.seed)
    aff = affinity_prior(warm, loader, ctx.data.tasks, int(opts["affinity_batches"]))
    return cluster_prior(aff, K, float(opts["prior_strength"])), aff


def warm_start_model(ctx: MethodContext, opts: dict[str, Any]) -> tuple[BranchedModel | None, float]:
    """The naive-MTL model the branches start from: the run's converged one (``warm_epochs`` unset) or a
    short naive-MTL run of ``warm_epochs`` epochs (last epoch kept), and its training seconds."""
    if not opts["warm_start"]:
        return None, 0.0
    epochs = opts["warm_epochs"]
    if epochs is None:
        model = naive_mtl_model(ctx)
        return model, float(ctx.cache.get("naive_mtl_seconds", 0.0))
    if int(epochs) < 1:
        raise ValueError(f"dmtg.warm_epochs must be >= 1, got {epochs!r}")
    key = f"naive_mtl_{int(epochs)}ep"
    if key not in ctx.cache:
        from dataclasses import replace

        short = replace(ctx, train=replace(ctx.train, epochs=int(epochs), early_stopping=0, select="last"))
        res = fit_grouping(short, Grouping.partition([ctx.data.task_names]), f"warm_start_{int(epochs)}ep")
        ctx.cache[key] = (res.model, res.train_seconds)
    return ctx.cache[key]


@torch.no_grad()
def start_from_initial_grouping(ctx: MethodContext, net: BranchedModel, s0: Tensor) -> None:
    """Give ``net`` (K branches x all N heads) the initial weights of the grouped model of S's initial
    assignment (argmax of ``s0``), as the ``fixed`` / ``oracle`` methods would build it at this seed,
    with each task's head copied into every branch (like the paper's identical copies).

    DMTG then differs from training its initial grouping only by what S's learning changes, so the
    two are a paired comparison instead of two draws of initialisation luck (on planted, init alone
    moves the total test loss by about 1 %).
    """
    assign = s0.argmax(dim=1).tolist()
    names = ctx.data.task_names
    used = sorted(set(assign))
    grouped = ctx.build_model(Grouping.partition([[t for t, k in zip(names, assign) if k == g] for g in used]))
    net.stem.load_state_dict(grouped.stem.state_dict())
    for j, g in enumerate(used):
        net.branches[g].load_state_dict(grouped.branches[j].state_dict())
    for t, g in zip(names, assign):
        head = grouped.head(used.index(g), t).state_dict()
        for k in range(len(net.branches)):
            net.head(k, t).load_state_dict(head)


@register_method("dmtg", OPTIONS)
def dmtg(ctx: MethodContext) -> MethodResult:
    """One-shot differentiable grouping into at most K groups (Gao et al. 2024)."""
    opts = resolve_options(ctx.options)
    N, K = len(ctx.data.tasks), ctx.K
    if K < 1 or K > N:
        raise ValueError(f"dmtg needs 1 <= K <= number of tasks ({N}), got K={K}")
    warm, warm_seconds = warm_start_model(ctx, opts)
    s0, affinity = initial_s(ctx, opts, warm)
    net = ctx.build_model(Grouping((tuple(ctx.data.task_names),) * K, {t: 0 for t in ctx.data.task_names}))
    if warm is not None:
        net.load_from_single_branch(warm)
    else:
        start_from_initial_grouping(ctx, net, s0)
    model = DMTGModel(net, ctx.data.task_names, s0, opts["grad_scaling"])
    objective = DMTGObjective(ctx.data.tasks, opts)
    result, _, _ = ctx.fit(model, "dmtg", score_test=False, objective=objective)
    model = result.model
    grouping = model.grouping()
    pruned = model.pruned()
    train_loader, val_loader, test_loader = ctx.loaders()
    seconds = result.train_seconds
    n_nets = 1
    if int(opts["finetune_epochs"]) > 0:
        from dataclasses import replace

        ft_ctx = replace(ctx, train=replace(ctx.train, epochs=int(opts["finetune_epochs"])))
        ft, _, _ = ft_ctx.fit(pruned, "dmtg_finetune", score_test=False)
        pruned = ft.model
        seconds += ft.train_seconds
    val = evaluate(pruned, val_loader, ctx.data.tasks)
    test = evaluate(pruned, test_loader, ctx.data.tasks)
    history = [{"epoch": h["epoch"], "tau": h.get("tau"), "live_heads": h.get("live_heads"),
                "assignment_probs": h.get("assignment_probs")} for h in result.history]
    extra: dict[str, Any] = {
        "recipe": opts["recipe"], "options": opts, "best_epoch": result.best_epoch,
        "assignment_probs": model.probabilities().tolist(), "S": model.S.detach().tolist(),
        "live_heads_final": int(model.live.sum()), "live_heads_history": [h["live_heads"] for h in history],
        "dmtg_history": history, "warm_start_seconds": warm_seconds,
        "affinity_prior": affinity.tolist() if affinity is not None else None,
        "one_shot": int(opts["finetune_epochs"]) == 0,
    }
    variants = {}
    for init in opts["retrain"]:
        variants[f"retrain_{init}"] = fit_grouping(ctx, grouping, f"retrain_{init}", init=init)
    if variants:
        extra["variants"] = variants
    if ctx.figures_dir is not None and history and history[-1]["assignment_probs"] is not None:
        from taskgrouping.report import assignment_heatmaps

        ctx.figures_dir.mkdir(parents=True, exist_ok=True)
        figure = ctx.figures_dir / f"{ctx.name or 'dmtg'}_assignment.png"
        assignment_heatmaps([h["assignment_probs"] for h in history], ctx.data.task_names, figure)
        extra["assignment_figure"] = str(figure)
    ctx.cache["dmtg_model"] = model
    return MethodResult(grouping, pruned, test, val, seconds + warm_seconds, n_networks=n_nets, extra=extra)
