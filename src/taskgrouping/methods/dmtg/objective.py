"""DMTG's per-step loss (Gao et al. 2024, Eq. 4-5) and its per-epoch updates.

    Z = gumbel_softmax(S, tau)   (one draw per step for the whole batch, over the K groups)
    L = sum_i sum_k Z_ik L_ik

Weights and S train together. Beyond the paper: ``samples`` Gumbel draws per step; a warm-up that holds
S fixed while the branches specialise (``warmup="probe"``: each branch learns only from the heads S
assigns to it, the others fit linear probes on detached features, weighed by softmax(S / tau), so the
branches train exactly as the initial grouping would and L_ik is a fair measure once S learns;
``"softmax"`` lets every head train its branch, ``"gumbel"`` also draws Z, as the paper does;
``"uniform"`` trains every head on its branch with weight 1/K, so the branches learn every task whatever
the start and the attribution affinity measured meanwhile does not echo the start); head pruning once a
task's row of S has converged; ``select_converged`` (the result is chosen among the epochs after S has
converged, so early stopping cannot end S's learning; with ``rewind`` training then continues from the
best epoch's weights with S's learned assignment, shrunk and perturbed where the run stops early; a run
that would end before S has converged goes on, up to ``max_extension`` epochs); the
``attribution_weight`` pull of S towards branches whose tasks read the same inputs
(:mod:`taskgrouping.methods.dmtg.attribution`); and the opt-in ``mates_weight`` pull of S_i towards the
branches whose tasks' gradients agree with task i's, effects that S's own-loss gradient cannot see
(recovery rates: ``benchmarks/results/dmtg_learning*.md``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from taskgrouping.balancing.task_gradients import task_gradients
from taskgrouping.engine.hooks import ObjectiveBase, StepOutput
from taskgrouping.methods.dmtg.attribution import AttributionAffinity, pull_loss
from taskgrouping.methods.dmtg.model import DMTGModel
from taskgrouping.methods.dmtg.options import DMTGOptions
from taskgrouping.tasks import Task

__all__ = ["DMTGObjective"]


class DMTGObjective(ObjectiveBase):
    """Per-step loss of DMTG (Eq. 5): each task's loss is sum_k Z_ik L_ik with Z ~ Gumbel-softmax(S, tau).

    ``samples > 1`` averages that over several Gumbel draws of the same step (heads are computed
    once; only the weights change), which lowers the variance of S's gradient at no extra forward cost.
    """

    def __init__(self, tasks: list[Task], opts: DMTGOptions, epochs: int | None = None,
                 early_stopping: bool = False, max_extension: int = 0) -> None:
        self.tasks = {t.name: t for t in tasks}
        self.opts = opts
        self.epochs = epochs  # the run's length: warm-up epochs are held back from selection if S learns after them
        self.max_extension = max_extension  # epochs the run may go past ``epochs`` while S has not converged
        self.extended = 0  # epochs added so far
        self.early_stopping = early_stopping  # the run stops early: shrink and perturb at the rewind (see below)
        self.tau = self.tau_at(0)
        self.warming_up = int(opts.s_warmup_epochs) > 0
        self.mates: Tensor | None = None  # K x N x N running cosines of the tasks' gradients on each branch
        self.calls = self.measured = 0
        self.converged_at: int | None = None  # the epoch S converged (with select_converged)
        self.learned: dict[str, Any] | None = None  # S, live, low_epochs to restore after a rewind
        self.attribution = (AttributionAffinity(len(tasks), float(opts.attribution_decay),
                                                int(opts.attribution_samples))
                            if float(opts.attribution_weight) else None)

    def state_dict(self) -> dict[str, Any]:
        return {"mates": None if self.mates is None else self.mates.tolist(), "calls": self.calls,
                "measured": self.measured, "converged_at": self.converged_at, "learned": self.learned,
                "extended": self.extended,
                "attribution": None if self.attribution is None else self.attribution.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mates = None if state.get("mates") is None else torch.tensor(state["mates"])
        self.calls, self.measured = int(state.get("calls", 0)), int(state.get("measured", 0))
        self.converged_at, self.learned = state.get("converged_at"), state.get("learned")
        self.extended = int(state.get("extended", 0))
        if self.attribution is not None and state.get("attribution") is not None:
            self.attribution.load_state_dict(state["attribution"])

    def measure_mates(self, model: DMTGModel, feats: dict[int, Tensor], targets: dict[str, Tensor]) -> None:
        """Update the running cosine between every two tasks' gradients w.r.t. each branch's parameters
        (Mao et al.'s gradient direction similarity, per branch): how much training task i on branch k
        moves it the way branch k's other tasks need. Measured in the warm-up too (probes included), so
        that the estimate has settled when S starts to learn."""
        K, N = model.K, len(model.task_names)
        if self.mates is None:
            self.mates = torch.zeros(K, N, N)
        self.measured += 1
        decay = min(float(self.opts.mates_decay), 1 - 1 / self.measured)  # a plain mean until 1/(1-decay)
        tasks = [self.tasks[t] for t in model.task_names]
        for k, f in feats.items():
            params = [p for p in model.net.branches[k].parameters() if p.requires_grad]
            idx, losses = model.branch_losses(k, f, targets, tasks)
            if len(idx) < 2 or not params:
                continue
            rows = task_gradients({model.task_names[i]: loss for i, loss in zip(idx, losses)}, params)
            G = F.normalize(rows.float(), dim=1).cpu()
            sel = torch.tensor(idx)
            block = self.mates[k][sel[:, None], sel[None, :]]
            self.mates[k][sel[:, None], sel[None, :]] = decay * block + (1 - decay) * (G @ G.T)

    def mates_loss(self, model: DMTGModel) -> Tensor | None:
        """-weight * sum_ik p_ik A_ik with A_ik = sum_{j != i} p_jk cos_k(i, j) (A and p_jk held fixed): its
        gradient moves S_i towards the branches whose current tasks' gradients agree with task i's."""
        if self.mates is None or not float(self.opts.mates_weight):
            return None
        p = model.probabilities()  # N x K
        mates = self.mates.to(p.device) * (1 - torch.eye(p.shape[0], device=p.device))  # K x N x N, no self term
        pull = torch.einsum("kij,jk->ik", mates, p.detach())
        return -float(self.opts.mates_weight) * (p * pull).sum()

    def tau_at(self, epoch: int) -> float:
        """The Gumbel temperature of ``epoch``: constant, or decaying exponentially down to ``tau_end``."""
        o = self.opts
        if o.tau_schedule == "constant":
            return float(o.tau)
        return max(float(o.tau_end), float(o.tau_start) * float(o.tau_decay) ** epoch)

    def param_groups(self, model: DMTGModel) -> list[dict[str, Any]]:
        weights = [p for n, p in model.named_parameters() if n != "S" and p.requires_grad]
        s_group: dict[str, Any] = {"params": [model.S], "weight_decay": 0.0}
        if self.opts.s_lr is not None:
            s_group["lr"] = float(self.opts.s_lr)
        return [{"params": weights}, s_group]

    def on_epoch_start(self, epoch: int, model: DMTGModel) -> None:
        self.tau = self.tau_at(epoch)
        # S stays fixed while the branches first specialise under the initial assignment
        self.warming_up = epoch < int(self.opts.s_warmup_epochs)
        model.S.requires_grad_(not self.warming_up)
        if self.learned is not None:  # after a rewind at convergence: S's learned state, the older weights
            with torch.no_grad():
                for name, value in self.learned.items():
                    getattr(model, name).copy_(torch.tensor(value, dtype=getattr(model, name).dtype))
                if self.early_stopping and float(self.opts.shrink) < 1:
                    self.shrink_perturb(model)
            self.learned = None

    @torch.no_grad()
    def shrink_perturb(self, model: DMTGModel) -> None:
        """theta <- shrink * theta + N(0, perturb^2) for every weight but S (Ash & Adams, NeurIPS 2020): the
        grouped model continues from weights trained on every task in the warm-up, and a warm-started network
        generalises worse than a fresh one unless its weights are shrunk and perturbed. Only where the run
        stops early: there the epochs left are not what limits the model; in a run of fixed length the
        weights' progress is kept."""
        for name, p in model.named_parameters():
            if name != "S":
                p.mul_(float(self.opts.shrink)).add_(torch.randn_like(p), alpha=float(self.opts.perturb))

    def __call__(self, model: DMTGModel, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        names = model.task_names
        mode = self.opts.warmup if self.warming_up else "gumbel"
        head_loss, feats = model.head_losses(x, targets, [self.tasks[t] for t in names], probe=mode == "probe")
        logits = model.masked_logits()
        if mode == "uniform":  # every head trains its branch alike: the warm-up does not depend on the start
            per_task = head_loss.mean(dim=1)
        elif mode != "gumbel":
            per_task = (F.softmax(logits / self.tau, dim=1) * head_loss).sum(dim=1)
        else:
            z = torch.zeros_like(logits)
            for _ in range(int(self.opts.samples)):
                z = z + F.gumbel_softmax(logits, tau=self.tau, hard=bool(self.opts.hard), dim=1)
            z = z / int(self.opts.samples)
            per_task = (z * head_loss).sum(dim=1)
        extra = None
        if self.opts.entropy_weight:
            p = model.probabilities()
            ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1).mean()
            extra = float(self.opts.entropy_weight) * ent
        if (float(self.opts.mates_weight) or self.attribution is not None) and torch.is_grad_enabled():
            step, self.calls = self.calls, self.calls + 1  # training steps seen: when to measure
            pulls = []
            if float(self.opts.mates_weight):
                if step % int(self.opts.mates_every) == 0:
                    self.measure_mates(model, feats, targets)
                pulls.append(None if self.warming_up else self.mates_loss(model))
            if self.attribution is not None:
                # once S has converged (heads pruned to one per task) the pull has no gradient left: no measuring
                if step % int(self.opts.attribution_every) == 0 and self.converged_at is None:
                    self.attribution.measure(model, x, targets, [self.tasks[t] for t in names])
                if not self.warming_up:
                    self.attribution.keep_warm()
                    pulls.append(pull_loss(model.probabilities(), self.attribution.matrix(),
                                           float(self.opts.attribution_weight)))
            for pull in pulls:
                if pull is not None:
                    extra = pull if extra is None else extra + pull
        return StepOutput({t: per_task[i] for i, t in enumerate(names)}, feats, extra)

    def converged(self, model: DMTGModel) -> bool:
        """Whether every task's row of S has settled on one branch: one live head left with head pruning,
        else the other branches' probabilities below ``prune_threshold``."""
        if self.opts.head_pruning:
            return bool((model.live.sum(dim=0) <= 1).all())
        p = model.probabilities()
        return bool((1 - p.max(dim=1).values < float(self.opts.prune_threshold)).all())

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, model: DMTGModel) -> dict[str, Any]:
        if self.opts.head_pruning and epoch >= int(self.opts.s_warmup_epochs):
            p = model.probabilities().T  # K x N
            low = (p < float(self.opts.prune_threshold)) & model.live
            model.low_epochs.copy_(torch.where(low, model.low_epochs + 1, torch.zeros_like(model.low_epochs)))
            # a task's other heads go together, once every one of them has stayed below the threshold for
            # prune_patience epochs: S's row has converged, so pruning ends no learning that is still going on
            keep = torch.zeros_like(low)
            keep[torch.tensor(model.assignment()), torch.arange(len(model.task_names))] = True
            settled = ((model.low_epochs >= int(self.opts.prune_patience)) | keep | ~model.live).all(dim=0)
            model.live &= keep | ~settled
        facts: dict[str, Any] = {}
        if self.warming_up and self.epochs is not None and int(self.opts.s_warmup_epochs) < self.epochs:
            facts["selectable"] = False  # S has not learned yet: the weights of the start, not DMTG's result
            if self.opts.rewind and not self.opts.select_converged and epoch == int(self.opts.s_warmup_epochs) - 1:
                facts["rewind"] = True  # S starts learning from the best held epoch's weights
        elif self.opts.select_converged and self.converged_at is None:
            if self.converged(model):
                self.converged_at = epoch
            # with epochs left, training continues from the best epoch's weights with S's learned assignment
            rewind = (self.converged_at is not None and self.opts.rewind
                      and (self.epochs is None or epoch < self.epochs - 1))
            if self.converged_at is None or rewind:
                facts["selectable"] = False  # S is still learning: early stopping must not end it
            if (self.converged_at is None and self.epochs is not None and epoch >= self.epochs + self.extended - 1
                    and self.extended < self.max_extension):
                facts["extend"] = True  # the run would end with S still learning: one more epoch
                self.extended += 1
            if rewind:
                facts["rewind"] = True
                self.learned = {n: getattr(model, n).detach().cpu().tolist() for n in ("S", "live", "low_epochs")}
        if self.attribution is not None:
            facts["attribution_affinity"] = self.attribution.matrix().tolist()
        return {**facts, "tau": self.tau, "assignment_probs": model.probabilities().tolist(),
                "live_heads": int(model.live.sum()), "grouping": model.grouping().as_lists()}
