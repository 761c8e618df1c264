"""Per-task gradients at two levels, and the base class of the gradient balancers built on them.

A gradient balancer (PCGrad, MGDA, CAGrad, ...) looks at every task's gradient separately and
turns the stack of them, the Jacobian ``J`` (tasks x dimensions), into one update. Where those
gradients are taken is the *level*:

**Parameter level** (default). Row ``t`` of ``J`` is ``dL_t/dtheta`` over the shared parameters
(one backward per task through the whole network). The aggregated vector is written into the
shared parameters' ``.grad``.

**Feature level** (``feature_level=True``; the fast gradient surrogate of Mao et al. 2024, and the
upper-bound trick of Sener & Koltun 2018, Sec. 3.3). Row ``t`` is ``dL_t/dZ`` for the shared
features ``Z`` the heads read (one list entry per branch of a ``BranchedModel``). The per-task
gradients stop at ``Z``, so they cross only the heads - and when every task has its own head, ONE
backward of ``sum_t L_t`` through the heads gives all of them, each task's ``dL_t/dZ`` read off
its edges into ``Z`` (:func:`task_feature_grads`; otherwise one backward per task). The
aggregated feature gradient then goes through the trunk in ONE backward, so the step costs about
an EW step plus the aggregation. Two choices are open and exposed as options:

* ``feature_reduction="sample"`` (default): rows are the whole ``B x D`` feature gradient,
  flattened - the true Jacobian of the losses w.r.t. the batch's features, as in MGDA-UB; the
  aggregated row is reshaped to ``B x D`` and back-propagated as is.
  ``feature_reduction="batch"``: rows are the feature gradients summed over the batch (one
  ``D``-vector per task; cheaper to aggregate for large batches, but it hides disagreements between
  samples); the task weights computed from those sums are applied to the per-sample gradients
  (GradDrop: its sign-purity mask is computed from the sums and applied per sample, as in the
  GradDrop paper, which reduces over the batch for the same reason).

Task-specific parameters (heads, and any other parameter a loss reaches without passing through
the shared parameters or features) get, by default, the plain sum of their tasks' gradients
(``head_grads="unweighted"``): a head serves one task, so there is nothing to balance, and
method weights that sum to one (MGDA, CAGrad) would otherwise shrink the heads' learning rate.
``head_grads="weighted"`` gives them ``sum_t w_t dL_t/dphi`` with the method's task weights
instead (methods without task weights, e.g. GradDrop, fall back to unweighted). Both come from
the backward passes already made, at no extra cost.

Gradients accumulate into ``.grad`` like ``loss.backward()`` does.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from taskgrouping.balancing.base import Balancer

FeatureReduction = Literal["sample", "batch"]
HeadGrads = Literal["unweighted", "weighted"]


def graph_leaves(roots: Sequence[Tensor], stop: Sequence[Tensor] = ()) -> list[Tensor]:
    """Leaf tensors requiring grad that ``roots`` depend on without passing through ``stop``.

    Walks the autograd graph from the roots; a path is cut where it reaches one of the ``stop``
    tensors (e.g. the shared features), so with ``stop=features`` the result is the heads'
    parameters (plus any other parameter read directly by the losses).
    """
    stop_nodes = {f.grad_fn for f in stop if f.grad_fn is not None}
    stop_leaves = {id(f) for f in stop if f.grad_fn is None}
    seen: set = set()
    found: dict[int, Tensor] = {}
    todo = [r.grad_fn for r in roots if r.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node in seen or node in stop_nodes:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None and id(var) not in stop_leaves:
            found.setdefault(id(var), var)
        todo.extend(n for n, _ in node.next_functions if n is not None)
    return list(found.values())


def _reaches_another(nodes: Sequence[Any], edges: Mapping[tuple[Any, int], int]) -> bool:
    """Whether the reverse graph below the features' ``nodes`` holds an edge into a feature, i.e.
    one feature is computed from another."""
    seen = set(nodes)
    stack = list(nodes)
    while stack:
        for edge in stack.pop().next_functions:
            if edge[0] is None:
                continue
            if edge in edges:
                return True
            if edge[0] not in seen:
                seen.add(edge[0])
                stack.append(edge[0])
    return False


def feature_taps(losses: Sequence[Tensor], feats: Sequence[Tensor]
                 ) -> tuple[list[list[tuple[Any, int, int]]], list[tuple[Tensor, int]]] | None:
    """Where each task's graph enters the features, when one reverse pass can separate the tasks.

    Walks each loss's graph down to the features. Returns, per task, its *taps* ``(node, input
    slot, feature index)`` - the edges from the task's nodes into a feature - and the leaves the
    losses reach above the features (with their task), or ``None`` when the walks are not disjoint:
    a node above the features reached by two tasks (a shared head layer or parameter), a loss that
    is itself a feature, two features on one graph edge, or a feature computed from another (its
    gradient would include the path through the other). When disjoint, a reverse pass of
    ``sum_t L_t`` carries exactly ``dL_t/dZ_k`` on task ``t``'s taps into feature ``k``: the trick
    behind one-pass per-task feature gradients (here and in :mod:`taskgrouping.diagnostics`).
    Losses without a graph have no taps. Features may be leaves (their AccumulateGrad edge).
    """
    edges: dict[tuple[Any, int], int] = {}
    for k, z in enumerate(feats):
        edge = get_gradient_edge(z)
        if (edge.node, edge.output_nr) in edges:
            return None
        edges[(edge.node, edge.output_nr)] = k
    nodes = {node for node, _ in edges}
    if len(feats) > 1 and _reaches_another(list(nodes), edges):
        return None
    owner: dict[Any, int] = {}
    taps: list[list[tuple[Any, int, int]]] = [[] for _ in losses]
    leaves: list[tuple[Tensor, int]] = []
    for t, loss in enumerate(losses):
        if loss.grad_fn is None:
            continue
        if loss.grad_fn in nodes:
            return None
        todo = [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node in owner:
                if owner[node] != t:
                    return None
                continue
            owner[node] = t
            var = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
            if var is not None:
                leaves.append((var, t))
            for slot, edge in enumerate(node.next_functions):
                if edge[0] is None:
                    continue
                k = edges.get(edge)
                if k is not None:
                    taps[t].append((node, slot, k))
                elif edge[0] in nodes:
                    return None  # another output of a node that makes a feature
                else:
                    todo.append(edge[0])
    return taps, leaves


def task_feature_grads(losses: Sequence[Tensor], feats: Sequence[Tensor], create_graph: bool = False,
                       with_heads: bool = True,
                       ) -> tuple[list[list[Tensor | None]], list[Tensor], list[list[Tensor | None]]]:
    """Per-task gradients w.r.t. the shared features and the task-specific leaves (the heads).

    Returns ``(feature_grads, heads, head_grads)``: ``feature_grads[t][k] = dL_t/dZ_k``, the
    leaves the losses reach without passing through the features, and ``head_grads[t][j] =
    dL_t/dphi_j`` (``None`` where unused). When the heads' graphs are disjoint (each task's own
    head, see :func:`feature_taps`) ONE backward of ``sum_t L_t`` through the heads gives all of
    them: each task's feature gradient is read off its edges into the features by node hooks.
    Otherwise it takes one backward per task. The graph is kept (the trunk's backward comes next);
    ``create_graph`` also records the graph of the returned gradients (for double backward).
    ``with_heads=False`` skips the heads' gradients (``heads`` and ``head_grads`` come back empty).
    """
    feats = list(feats)
    found = feature_taps(losses, feats)
    if found is None:
        heads = graph_leaves(losses, stop=feats) if with_heads else []
        inputs = feats + heads
        feature_grads, head_grads = [], []
        for loss in losses:
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, create_graph=create_graph,
                                        allow_unused=True) if loss.requires_grad else [None] * len(inputs)
            feature_grads.append(list(grads[:len(feats)]))
            head_grads.append(list(grads[len(feats):]))
        return feature_grads, heads, head_grads
    taps, leaves = found
    leaves = leaves if with_heads else []
    heads = [leaf for leaf, _ in leaves]
    feature_grads: list[list[Tensor | None]] = [[None] * len(feats) for _ in losses]

    def tap(t: int, i: int, k: int):
        def hook(grad_inputs, grad_outputs):
            g = grad_inputs[i]
            if g is not None:
                feature_grads[t][k] = g if feature_grads[t][k] is None else feature_grads[t][k] + g
        return hook

    live = [loss for loss in losses if loss.requires_grad]
    grads: Sequence[Tensor | None] = [None] * (len(feats) + len(heads))
    handles = [node.register_hook(tap(t, i, k)) for t, task in enumerate(taps) for node, i, k in task]
    try:
        if live:
            grads = torch.autograd.grad(torch.stack(live).sum(), feats + heads, retain_graph=True,
                                        create_graph=create_graph, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    head_grads: list[list[Tensor | None]] = [[None] * len(heads) for _ in losses]
    for j, (g, (_, t)) in enumerate(zip(grads[len(feats):], leaves)):
        head_grads[t][j] = g
    return feature_grads, heads, head_grads


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
        for t, loss in enumerate(losses):
            if not loss.requires_grad:
                grads: Sequence[Tensor | None] = [None] * len(inputs)
            else:
                grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            parts = []
            for i, (p, g) in enumerate(zip(shared, grads[:len(shared)])):
                reached[i] = reached[i] or g is not None
                parts.append(torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if g is None
                             else g.reshape(-1).float())
            rows.append(torch.cat(parts))
            head_grads.append(grads[len(shared):])
        jac = torch.stack(rows)
        direction, w = self.combine(jac, jac.unsqueeze(1))
        direction = direction[0]
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
        feature_grads, heads, head_grads = task_feature_grads(losses, feats)
        rows = []
        for grads in feature_grads:
            flat = [(torch.zeros_like(f) if g is None else g).reshape(lead, -1) for f, g in zip(feats, grads)]
            rows.append(flat[0] if len(flat) == 1 else torch.cat(flat, dim=1))
        jac = torch.stack(rows).float()  # T x lead x D
        stat = jac[:, 0] if lead == 1 else jac.sum(dim=1)
        combined, w = self.combine(stat, jac)
        grads_out, offset = [], 0
        for f in feats:
            n = f.numel() // lead
            grads_out.append(combined[:, offset:offset + n].reshape(f.shape).to(f.dtype))
            offset += n
        torch.autograd.backward(feats, grad_tensors=grads_out)
        self._write_heads(heads, head_grads, self._head_coefficients(len(losses), w))
        return w


__all__ = ["GradientBalancer", "graph_leaves", "feature_taps", "task_feature_grads", "check_losses", "accumulate_grad", "FeatureReduction",
           "HeadGrads"]
