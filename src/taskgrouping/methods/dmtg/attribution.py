"""Which tasks read the same inputs: an affinity of the tasks' input attributions, measured on the
DMTG model while it trains, and the pull it gives S.

Task i's attribution on sample s is g_i(s) = dL_i(s)/dx_s, the gradient of its loss w.r.t. the input,
read through every branch of the DMTG model (its head there). Tasks that depend on the same inputs
(the same image region, the same subspace of a feature vector) have attributions there, whichever
branch serves them and whether or not their labels correlate; cf. Song et al. (NeurIPS 2019), who
compare attribution maps to predict transferability between tasks. Two views of "the same inputs"
are averaged:

* directions: the cosine of the attribution second moments M_i = E[g_i g_i^T],
  <M_i, M_j>_F = ||G_i G_j^T||_F^2 / n^2 (G_i: the n x d attributions of a batch; sign-free). It sees
  tasks that read one subspace of a feature vector, not aligned with its coordinates;
* coordinates: the cosine of the per-coordinate energies e_i = E[g_i ** 2] (the diagonal of M_i, a
  saliency map). It sees tasks that read the same pixels in different ways (a digit's mask and its
  edges), where the direction view is dominated by how each task reads them.

Both are summed over branches and averaged over measurements. Once S starts to learn, the pull uses
the mean of that running affinity and the one at the end of the warm-up.

The pull on S is a soft clustering objective: with C = a minus the mean affinity of all pairs of tasks,
scaled to mean |C_ij| = 1 (so that the weight means the same on every dataset),
A_ik = sum_{j != i} C_ij p_jk / max(1, sum_{j != i} p_jk) is task i's mean centred affinity to the
other members of branch k; the loss -weight * sum_ik p_ik A_ik (A held fixed) moves S_i towards the
branch whose members are closest to task i. The mean (not the sum) keeps two groups from merging
into one branch because their cross affinity is slightly above average; empty branches give A = 0, so
a task less like a branch's members than the mean pair leaves it for an empty branch (cf. the constant
Potts model of community detection, Traag et al. 2011, with the mean affinity as its resolution). Centring
each task's row on its own mean instead makes a branch holding every other task exactly as attractive
as an empty one, so nothing splits S once its own-loss gradient has drawn all tasks into the branch that
learned fastest (as it did on sklearn digits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.balancing.task_gradients import task_gradients
from taskgrouping.engine.distributed import Ranks
from taskgrouping.tasks import Task

__all__ = ["AttributionAffinity", "branch_views", "global_rows", "pull_loss"]


class AttributionAffinity:
    """Running second-moment inner products of the tasks' input attributions (N x N), summed over the
    views of the model (a DMTG model's branches; any other model is one view).

    Args:
        n_tasks: N.
        decay: running-mean decay per measurement (a plain mean for the first 1 / (1 - decay)).
        samples: the rows of a batch measured (the first ``samples``).
    """

    def __init__(self, n_tasks: int, decay: float = 0.9, samples: int = 32) -> None:
        self.inner = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)
        self.decay = float(decay)
        self.samples = int(samples)
        self.measured = 0
        self.energy: Tensor | None = None  # N x d running mean of the per-coordinate attribution energy
        self.warm: Tensor | None = None  # the affinity at the end of the warm-up (see :meth:`keep_warm`)
        self._matrix: Tensor | None = None  # :meth:`matrix`, until the next measurement (read every step)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.tolist(), "measured": self.measured,
                "energy": None if self.energy is None else self.energy.tolist(),
                "warm": None if self.warm is None else self.warm.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner = torch.tensor(state["inner"], dtype=torch.float64)
        self.measured = int(state["measured"])
        self.energy = None if state.get("energy") is None else torch.tensor(state["energy"], dtype=torch.float64)
        self.warm = None if state.get("warm") is None else torch.tensor(state["warm"])
        self._matrix = None

    def keep_warm(self) -> None:
        """Keep the current affinity (called once, when S starts to learn). It was measured while the
        branches trained the initial grouping, before S's moves shaped them; once S moves tasks, the
        branches specialise to the new grouping and the running affinity can drift towards it (on
        multimnist_dense it does), so :meth:`matrix` averages the two."""
        if self.warm is None:
            self.warm = self.cosines()
            self._matrix = None

    def measure(self, model: nn.Module, x: Tensor, targets: dict[str, Tensor], tasks: list[Task]) -> None:
        """One measurement on the first ``samples`` rows of a batch, with ``model`` in eval mode (no
        batch-norm statistics or dropout draws change: training is unaffected) and its parameters'
        ``.grad`` untouched.

        On a DMTG model every branch is read by all its live heads (probes included) and the inner
        products are summed over the branches: a misplaced task's attribution through its own branch
        mimics that branch's features, through the others it does not, so the affinity does not merely
        echo which tasks share a branch now.

        Under ``torchrun`` the rows are the first ``samples`` of the global batch, gathered from the
        ranks' slices, and rank 0's measurement is every rank's: the one-process measurement, whatever
        each rank's batch-norm statistics."""
        if not x.is_floating_point():
            raise ValueError(f"dmtg.attribution_weight differentiates the task losses w.r.t. the inputs, which are "
                             f"{x.dtype}; expected floating-point inputs (or set dmtg.attribution_weight=0)")
        ranks = Ranks.current()
        x, targets = global_rows(ranks, x, targets, self.samples)
        n = x.shape[0]
        xs = x.detach().requires_grad_(True)
        index = {t.name: i for i, t in enumerate(tasks)}
        inner = torch.zeros_like(self.inner)
        energy = None
        was_training = model.training
        model.eval()
        try:
            for keys in branch_views(model, [t.name for t in tasks]):
                with torch.enable_grad():
                    if keys is None:
                        named = model(xs)
                    else:
                        preds, _ = model.forward_heads(xs, keys)
                        named = {t: pred for (_, t), pred in preds.items()}
                    losses = {t: tasks[index[t]].loss(pred, targets[t]) for t, pred in named.items()}
                    G = task_gradients(losses, [xs], retain_graph=False)
                G = G.reshape(len(losses), n, -1).double()
                # <M_i, M_j>_F = ||G_i G_j^T||_F^2 / n^2 for every pair, from the n x n cross-Gram blocks
                block = torch.einsum("isd,jtd->ijst", G, G).square().sum(dim=(2, 3)).cpu() / n ** 2
                sel = torch.tensor([index[t] for t in losses])
                inner[sel[:, None], sel[None, :]] += block
                if energy is None:
                    energy = torch.zeros(len(tasks), G.shape[2], dtype=torch.float64)
                energy[sel] += G.square().mean(1).cpu()
        finally:
            model.train(was_training)
        ranks.broadcast_tensors([inner] + ([] if energy is None else [energy]))
        self.measured += 1
        keep = min(self.decay, 1 - 1 / self.measured)
        self.inner = keep * self.inner + (1 - keep) * inner
        if energy is not None:
            self.energy = energy if self.energy is None else keep * self.energy + (1 - keep) * energy
        self._matrix = None

    def cosines(self) -> Tensor:
        """The running affinity a (N x N, ones on the diagonal; a task without attribution yet has
        a_ij = 0)."""
        d = self.inner.diag().clamp_min(0).sqrt()
        scale = d[:, None] * d[None, :]
        a = torch.where(scale > 0, self.inner / scale.clamp_min(1e-300), torch.zeros_like(self.inner))
        if self.energy is not None:  # the coordinates view, averaged with the directions view
            e = F.normalize(self.energy, dim=1)
            a = (a + e @ e.T) / 2
        return a.fill_diagonal_(1.0).float()

    def matrix(self) -> Tensor:
        """The affinity the pull uses: the running one, averaged with the warm-up's once it is kept."""
        if self._matrix is None:
            a = self.cosines()
            self._matrix = a if self.warm is None else (a + self.warm) / 2
        return self._matrix


def global_rows(ranks: Ranks, x: Tensor, targets: dict[str, Tensor], samples: int
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """The first ``samples`` rows of the global batch (inputs, targets) on every rank. Each rank holds a
    contiguous slice (:class:`~taskgrouping.data.base.ShardedBatchSampler`), so the ranks' first rows,
    in rank order, begin with the global batch's."""
    x, targets = x[:samples], {t: y[:samples] for t, y in targets.items()}
    if ranks.active:
        x = ranks.gather_rows(x)[0][:samples]
        targets = {t: ranks.gather_rows(y)[0][:samples] for t, y in targets.items()}
    return x, targets


def branch_views(model: nn.Module, names: list[str]) -> list[list[tuple[int, str]] | None]:
    """The head keys to read per branch of a DMTG model (its live heads; branches without any are
    skipped); ``[None]`` (``model(x)``: each task through the head that serves it) for any other model."""
    live = getattr(model, "live", None)
    if live is None or not hasattr(model, "forward_heads"):
        return [None]
    return [[(k, t) for i, t in enumerate(names) if live[k, i]] for k in range(live.shape[0]) if live[k].any()]


def pull_loss(p: Tensor, affinity: Tensor, weight: float) -> Tensor:
    """-weight * sum_ik p_ik A_ik with A_ik = sum_{j != i} C_ij p_jk / max(1, sum_{j != i} p_jk), C the
    affinity minus its mean over all pairs of tasks, scaled to mean |C_ij| = 1 (A and p_jk held fixed): its
    gradient moves S_i towards the branch whose other members are, on average, closer to task i than the
    mean pair is, and out of a branch whose members are not (into an empty one, A = 0)."""
    n = p.shape[0]
    if n < 2:
        return p.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=p.device)
    a = affinity.to(p.device, p.dtype)
    centred = torch.where(off, a - (a * off).sum() / (n * (n - 1)), torch.zeros_like(a))  # the mean pair: 0
    centred = centred / centred.abs().sum().div(n * (n - 1)).clamp_min(1e-12)  # mean |C_ij| = 1: unit-free
    member = p.detach()
    others = (member.sum(0, keepdim=True) - member).clamp_min(1.0)  # branch k's members besides task i
    pull = centred @ member / others
    return -float(weight) * (p * pull).sum()

