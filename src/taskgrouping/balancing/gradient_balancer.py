"""The base of the balancers that aggregate per-task gradients, at parameter or feature level.

A gradient balancer (PCGrad, MGDA, CAGrad, ...) looks at every task's gradient separately and
turns the stack of them, the Jacobian ``J`` (tasks x dimensions), into one update. Where those
gradients are taken is the *level* (both come from :mod:`taskgrouping.balancing.task_gradients`):

**Parameter level** (default). Row ``t`` of ``J`` is ``dL_t/dtheta`` over the shared parameters
(one backward per task through the whole network). The aggregated vector is written into the
shared parameters' ``.grad``.

**Feature level** (``feature_level=True``; the fast gradient surrogate of Mao et al. 2024, and the
upper-bound trick of Sener & Koltun 2018, Sec. 3.3). Row ``t`` is ``dL_t/dZ`` for the shared
features ``Z`` the heads read (one list entry per branch of a ``BranchedModel``), taken in ONE
backward through the heads when every task has its own head. The aggregated feature gradient then
goes through the trunk in ONE backward, so the step costs about an EW step plus the aggregation.
``feature_reduction="sample"`` (default): rows are the whole ``B x D`` feature gradient, flattened
(the true Jacobian w.r.t. the batch's features, as in MGDA-UB). ``feature_reduction="batch"``:
rows are the feature gradients summed over the batch (one ``D``-vector per task; cheaper, but it
hides disagreements between samples); the weights computed from those sums are applied to the
per-sample gradients (GradDrop's sign-purity mask likewise, as in the GradDrop paper).

Task-specific parameters (heads) get, by default, the plain sum of their tasks' gradients
(``head_grads="unweighted"``): a head serves one task, so there is nothing to balance, and
weights that sum to one (MGDA, CAGrad) would otherwise shrink the heads' learning rate.
``head_grads="weighted"`` gives them ``sum_t w_t dL_t/dphi`` instead (methods without task
weights, e.g. GradDrop, fall back to unweighted). Both come from the passes already made.

Gradients accumulate into ``.grad`` like ``loss.backward()`` does.

**Distributed** (``torchrun``; :attr:`~taskgrouping.balancing.base.Balancer.ranks`): the rows are
those of the global batch before anything is computed from them, so every rank gets the weights one
process gets. Parameter level: each rank's rows are its share of the global gradients, summed over
the ranks; every rank computes the same update and writes ``1/P`` of it. Feature level,
``"sample"``: a row is the gradient w.r.t. every sample's features, so the ranks' rows are gathered
(concatenated over the samples in rank order, as one process lays out the global batch) and each
rank sends its own samples' part of the combined gradient through its trunk; ``"batch"``: the
batch sums are summed over the ranks. Heads get the rank's share of their gradients.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from taskgrouping.balancing.base import Balancer
from taskgrouping.engine.distributed import Ranks
from taskgrouping.balancing.task_gradients import graph_leaves, iter_task_grads, task_feature_grads

FeatureReduction = Literal["sample", "batch"]
HeadGrads = Literal["unweighted", "weighted"]


def accumulate_grad(param: Tensor, grad: Tensor, owned: bool = False) -> None:
    """Add ``grad`` to ``param.grad``; ``owned``: ``grad`` is a fresh tensor nobody else holds, so
    it may become ``param.grad`` without a copy."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad if owned else grad.clone()
    else:
        param.grad += grad


def check_losses(losses: dict[str, Tensor], who: str) -> tuple[list[str], list[Tensor]]:
    if not losses:
        raise ValueError(f"balancer {who!r} got no task losses; expected a dict task name -> scalar loss")
    for name, loss in losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"balancer {who!r}: the loss of task {name!r} must be a scalar tensor, got "
                             f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}")
    return list(losses), [loss.reshape(()) for loss in losses.values()]


class GradientBalancer(Balancer):
    """Base of the balancers that aggregate per-task gradients (see the module docstring).

    Subclasses implement :meth:`weights` (task weights from a Jacobian) or, for methods that are
    not a weighting of the rows (GradDrop), :meth:`combine`.

    Args:
        feature_level: take per-task gradients w.r.t. the shared features instead of the shared
            parameters (fast surrogate; the trainer must pass ``features``).
        feature_reduction: ``"sample"`` or ``"batch"`` (feature level only; see module docstring).
        head_grads: ``"unweighted"`` or ``"weighted"`` gradients for task-specific parameters.
    """

    name = "gradient"
    needs_grads = True

    def __init__(self, feature_level: bool = False, feature_reduction: FeatureReduction = "sample",
                 head_grads: HeadGrads = "unweighted") -> None:
        if feature_reduction not in ("sample", "batch"):
            raise ValueError(f"balancer {self.name!r}: feature_reduction must be 'sample' or 'batch', "
                             f"got {feature_reduction!r}")
        if head_grads not in ("unweighted", "weighted"):
            raise ValueError(f"balancer {self.name!r}: head_grads must be 'unweighted' or 'weighted', "
                             f"got {head_grads!r}")
        self.feature_level = bool(feature_level)
        self.uses_features = self.feature_level
        self.feature_reduction = feature_reduction
        self.head_grads = head_grads

    # -- what a method defines -----------------------------------------------------------------
    def weights(self, jacobian: Tensor) -> Tensor:
        """Task weights (one per row of ``jacobian``); the update is ``weights @ jacobian``."""
        raise TypeError(f"balancer {self.name!r} defines neither weights() nor combine()")

    def combine(self, stat: Tensor, apply: Tensor) -> tuple[Tensor, Tensor | None]:
        """Aggregate: decide from ``stat`` (T x D), apply to ``apply`` (T x N x D).

        Returns the combined ``N x D`` gradient and the task weights (or ``None``). At parameter
        level and for sample-level features ``apply`` is ``stat`` with N = 1; for batch-reduced
        features ``stat`` is the batch sum of ``apply``.
        """
        w = self.weights(stat)
        return torch.einsum("t,tnd->nd", w.to(apply.dtype), apply), w

    def transform_losses(self, names: list[str], losses: list[Tensor]) -> list[Tensor]:
        """Hook: the losses whose gradients are aggregated (IMTL-L scales them)."""
        return losses

    # -- public helpers --------------------------------------------------------------------------
    def aggregate(self, jacobian: Tensor) -> Tensor:
        """The update vector for a parameter-level Jacobian (tasks x dimensions)."""
        if jacobian.ndim != 2:
            raise ValueError(f"balancer {self.name!r}: expected a Jacobian of shape (tasks, dims), "
                             f"got {tuple(jacobian.shape)}")
        out, _ = self.combine(jacobian, jacobian.unsqueeze(1))
        return out[0]

    # -- the contract ------------------------------------------------------------------------------
    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[Tensor],
                 features: Sequence[Tensor] | None = None) -> dict[str, float]:
        names, loss_list = check_losses(losses, self.name)
        loss_list = self.transform_losses(names, loss_list)
        if self.feature_level:
            w = self._backward_features(loss_list, features)
        else:
            w = self._backward_params(loss_list, shared_params)
        logs = self.extra_logs()
        if w is not None:
            logs.update({f"weight/{n}": float(v) for n, v in zip(names, w.tolist())})
        return logs

    def extra_logs(self) -> dict[str, float]:
        return {}

    def _head_coefficients(self, n_tasks: int, w: Tensor | None) -> list[float]:
        if self.head_grads == "weighted" and w is not None:
            return [float(v) for v in w.tolist()]
        return [1.0] * n_tasks

    def _write_heads(self, heads: list[Tensor], per_task: list[Sequence[Tensor | None]], coef: list[float]) -> None:
        for j, p in enumerate(heads):
            total, owned = None, False
            for t, grads in enumerate(per_task):
                g = grads[j]
                if g is None:
                    continue
                if coef[t] != 1.0:
                    g, owned = g * coef[t], True
                if total is None:
                    total = g
                else:
                    total, owned = total + g, True
            if total is not None:
                accumulate_grad(p, total, owned)

    def _backward_params(self, losses: list[Tensor], shared_params: Sequence[Tensor]) -> Tensor | None:
        shared = [p for p in (shared_params or []) if p.requires_grad]
        if not shared:
            raise ValueError(f"balancer {self.name!r} needs per-task gradients w.r.t. the shared parameters, "
                             "but shared_params is empty; pass the trunk's parameters or use feature_level=True")
        shared_ids = {id(p) for p in shared}
        heads = [p for p in graph_leaves(losses) if id(p) not in shared_ids]
        inputs = shared + heads
        rows: list[Tensor] = []
        head_grads: list[Sequence[Tensor | None]] = []
        reached = [False] * len(shared)
        for grads in iter_task_grads(losses, inputs):
            parts = []
            for i, (p, g) in enumerate(zip(shared, grads[:len(shared)])):
                reached[i] = reached[i] or g is not None
                parts.append(torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if g is None
                             else g.reshape(-1).float())
            rows.append(torch.cat(parts))
            head_grads.append(grads[len(shared):])
        jac = torch.stack(rows)
        ranks = self.ranks
        if ranks.active:  # the global batch's rows: the ranks' shares add up
            ranks.all_sum(jac)
            hit = ranks.all_sum(torch.tensor(reached, dtype=torch.int64, device=jac.device))
            reached = [bool(h) for h in hit.tolist()]
        direction, w = self.combine(jac, jac.unsqueeze(1))
        direction = direction[0]
        if ranks.active:  # every rank has the whole update; its share is 1/P of it
            direction = direction / ranks.world
        offset = 0
        for p, hit in zip(shared, reached):
            n = p.numel()
            if hit:
                accumulate_grad(p, direction[offset:offset + n].view_as(p))
            offset += n
        self._write_heads(heads, head_grads, self._head_coefficients(len(losses), w))
        return w

    def _backward_features(self, losses: list[Tensor], features: Sequence[Tensor] | None) -> Tensor | None:
        feats = list(features or [])
        if not feats:
            raise ValueError(f"balancer {self.name!r} with feature_level=True needs the shared features the "
                             "heads read (features=None was given); pass them or use feature_level=False")
        for k, f in enumerate(feats):
            if not isinstance(f, Tensor) or not f.requires_grad:
                raise ValueError(f"balancer {self.name!r}: feature {k} is not part of the autograd graph "
                                 "(requires_grad=False); pass the branch outputs the heads read, not detached copies")
        # Rows are flattened per sample for the batch reduction, whole for the sample-level one.
        lead = 1
        if self.feature_reduction == "batch":
            lead = feats[0].shape[0] if feats[0].ndim > 0 else 0
            if lead == 0 or any(f.ndim == 0 or f.shape[0] != lead for f in feats):
                raise ValueError(f"balancer {self.name!r}: feature_reduction='batch' needs every feature to have "
                                 f"the same batch size; got shapes {[tuple(f.shape) for f in feats]}")
        if self.ranks.active:
            same_features_everywhere(self.ranks, feats, self.name)
        feature_grads, heads, head_grads = task_feature_grads(losses, feats)
        if self.ranks.active and self.feature_reduction == "sample":
            w = self._backward_gathered(feats, feature_grads)
            self._write_heads(heads, head_grads, self._head_coefficients(len(losses), w))
            return w
        rows = []
        for grads in feature_grads:
            flat = [(torch.zeros_like(f) if g is None else g).reshape(lead, -1) for f, g in zip(feats, grads)]
            rows.append(flat[0] if len(flat) == 1 else torch.cat(flat, dim=1))
        jac = torch.stack(rows).float()  # T x lead x D
        stat = jac[:, 0] if lead == 1 else jac.sum(dim=1)
        if self.ranks.active:  # batch sums: the global batch's is the sum of the ranks'
            stat = self.ranks.all_sum(stat.contiguous())
        combined, w = self.combine(stat, jac)
        grads_out, offset = [], 0
        for f in feats:
            n = f.numel() // lead
            grads_out.append(combined[:, offset:offset + n].reshape(f.shape).to(f.dtype))
            offset += n
        torch.autograd.backward(feats, grad_tensors=grads_out)
        self._write_heads(heads, head_grads, self._head_coefficients(len(losses), w))
        return w


    def _backward_gathered(self, feats: list[Tensor], feature_grads: list[list[Tensor | None]]) -> Tensor | None:
        """Feature level, ``"sample"``, on several ranks: gather every rank's rows (T x samples x D per
        feature), combine the global batch's Jacobian, send this rank's samples' part through its trunk."""
        ranks = self.ranks
        parts, spans = [], []
        for k, f in enumerate(feats):
            g = torch.stack([torch.zeros_like(f) if grads[k] is None else grads[k] for grads in feature_grads]).float()
            whole, start = ranks.gather_rows(g, dim=1)  # T x B x ...
            spans.append((whole.shape[1:], start, f.shape[0]))
            parts.append(whole.reshape(len(feature_grads), 1, -1))
        jac = torch.cat(parts, dim=2)  # T x 1 x (B D_1 + B D_2 + ...): one process's layout
        combined, w = self.combine(jac[:, 0], jac)
        grads_out, offset = [], 0
        for f, (shape, start, n) in zip(feats, spans):
            size = int(np.prod(shape))
            whole = combined[0, offset:offset + size].reshape(shape)
            grads_out.append(whole.narrow(0, start, n).to(f.dtype).contiguous())
            offset += size
        torch.autograd.backward(feats, grad_tensors=grads_out)
        return w


def same_features_everywhere(ranks: Ranks, feats: Sequence[Tensor], who: str) -> None:
    """Feature level on several ranks: every rank must have computed the same shared features (a
    branch whose tasks have no label in one rank's slice is skipped there); the same error on every
    rank otherwise."""
    shapes = ranks.all_objects([tuple(f.shape[1:]) for f in feats])
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"balancer {who!r} at feature level: the ranks computed different shared features this step "
                         f"(per-sample shapes by rank {shapes}: a branch whose tasks have no label in a rank's slice "
                         "of the batch is skipped there); use feature_level=false or a larger train.batch_size")


def task_gramian(jacobian: Tensor) -> np.ndarray:
    """``J J^T`` in float64 on the CPU (``T x T``, whatever the level)."""
    j = jacobian.detach().double()
    return (j @ j.T).cpu().numpy()


class FeatureLevelOnly:
    """Mixin for the "-UB" variants (MGDA-UB, Aligned-MTL-UB): the method on the shared features'
    gradients, which bound the parameter-level problem (Sener & Koltun 2018, Sec. 3.3); always
    ``feature_level=True``, whatever is passed."""

    def __init__(self, **kw: Any) -> None:
        kw.pop("feature_level", None)
        super().__init__(feature_level=True, **kw)


class GramianBalancer(GradientBalancer):
    """A method whose task weights are a function of the task Gramian ``J J^T`` (and its own state),
    computed in float64 NumPy."""

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        raise TypeError(f"balancer {self.name!r} does not define gramian_weights()")

    def weights(self, jacobian: Tensor) -> Tensor:
        w = self.gramian_weights(task_gramian(jacobian))
        return torch.as_tensor(w, dtype=jacobian.dtype, device=jacobian.device)


__all__ = ["GradientBalancer", "GramianBalancer", "FeatureLevelOnly", "task_gramian", "check_losses", "accumulate_grad",
           "FeatureReduction", "HeadGrads", "same_features_everywhere"]
