"""Where DMTG's assignment logits S (N x K) start: uniform, small noise, a given matrix, or a prior.

The priors cluster a task affinity into K groups (:func:`cluster_prior`): the tasks' label correlations
(:func:`label_affinity`, training-free; the ``robust`` recipe's start where it is defined, and the
``label_clusters`` baseline) or their gradient cosines on the warm-start model (:func:`affinity_prior`).
The paper starts S uniform; a prior breaks the K branches' symmetry, which otherwise makes
the found grouping depend on the seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from taskgrouping.data.base import make_loader
from taskgrouping.device import model_device
from taskgrouping.models.branched import BranchedModel
from taskgrouping.tasks import Task

if TYPE_CHECKING:
    from taskgrouping.methods.base import MethodContext
    from taskgrouping.methods.dmtg.options import DMTGOptions

__all__ = ["InitialS", "affinity_prior", "cluster_prior", "initial_s", "label_affinity", "label_prior_fits"]


def label_prior_fits(tasks: list[Task]) -> bool:
    """Whether :func:`label_affinity` is defined for ``tasks``: scalar tasks (binary / regression) or only
    per-pixel regression ones."""
    kinds = {t.kind for t in tasks}
    return kinds <= {"binary", "regression"} or kinds == {"dense_regression"}


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
    device = model_device(model)
    for x, targets in loader:
        x, targets = x.to(device), {k: v.to(device) for k, v in targets.items()}
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
    if not label_prior_fits(tasks):
        bad = [t.name for t in tasks if t.kind not in ("binary", "regression")]
        raise ValueError(f"label correlations need binary / regression tasks or only dense_regression ones; "
                         f"{bad} do not fit (use dmtg.init=affinity)")
    dense = {t.kind for t in tasks} == {"dense_regression"}
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


class InitialS(NamedTuple):
    """S's start, the affinity it was clustered from (``None`` without a prior), and the ``init`` used
    (``auto`` resolved)."""

    s: Tensor
    affinity: np.ndarray | None
    init: str


def initial_s(ctx: MethodContext, opts: DMTGOptions, warm: BranchedModel | None) -> InitialS:
    """S's start for ``opts.init`` (``affinity`` is measured on the warm-start model ``warm``)."""
    N, K = len(ctx.data.tasks), ctx.K
    init = opts.init
    if init == "auto":  # the label prior where it is defined, else a small random symmetry breaker
        init = "labels" if all(t.kind in ("binary", "regression") for t in ctx.data.tasks) else "noisy"
    if init == "uniform":
        return InitialS(torch.zeros(N, K), None, init)
    if init == "noisy":
        g = torch.Generator().manual_seed(ctx.seed)
        return InitialS(float(opts.init_noise) * torch.randn(N, K, generator=g), None, init)
    if init == "prior":
        s = torch.as_tensor(opts.prior, dtype=torch.float32)
        if tuple(s.shape) != (N, K):
            raise ValueError(f"dmtg.prior must be N x K = {N} x {K} (tasks x groups), got shape {tuple(s.shape)}")
        return InitialS(s, None, init)
    if init == "labels":
        # unshuffled: the correlations do not depend on order, and no RNG is drawn from
        aff = label_affinity(make_loader(ctx.data.train, ctx.train.batch_size, shuffle=False), ctx.data.tasks)
        return InitialS(cluster_prior(aff, K, float(opts.prior_strength)), aff, init)
    assert warm is not None, "DMTGOptions requires warm_start with init=affinity"
    loader = ctx.loaders()[0]
    torch.manual_seed(ctx.seed)
    aff = affinity_prior(warm, loader, ctx.data.tasks, int(opts.affinity_batches))
    return InitialS(cluster_prior(aff, K, float(opts.prior_strength)), aff, init)
