"""Per-task gradients: the one place that differentiates each task's loss on its own.

Gradient balancers (PCGrad, MGDA, CosReg, GradNorm, ...) and the diagnostics (GDS / GMS / FD of
Mao et al. 2024) all need ``dL_t/dx`` for every task ``t`` separately, w.r.t. the shared
parameters or the shared features ``Z`` the heads read. Two ways to get them live here:

* **one reverse pass per task** (:func:`iter_task_grads`), the only exact way for parameters;
* **one reverse pass for all tasks** at the features, when each task reaches ``Z`` through its own
  part of the graph (its head): the pass of ``sum_t L_t`` then carries exactly ``dL_t/dZ`` on task
  ``t``'s edges into ``Z`` (:func:`feature_taps`), which node hooks record
  (:func:`task_feature_grads`). This is the cheap "fast gradient surrogate" level (Mao et al.
  2024; the upper-bound trick of Sener & Koltun 2018, Sec. 3.3).

:func:`task_gradients` stacks the rows into a ``T x P`` matrix (the task Jacobian).
Everything uses :func:`torch.autograd.grad`, so ``.grad`` is never read or written here.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

Grads = Sequence[Tensor | None]
TensorArg = Tensor | Sequence[Tensor] | Mapping[Any, Tensor] | None


def as_tensor_list(tensors: TensorArg) -> list[Tensor]:
    """A tensor, a sequence or the values of a mapping of tensors, as a list (``None``: empty)."""
    if tensors is None:
        return []
    if isinstance(tensors, Tensor):
        return [tensors]
    if isinstance(tensors, Mapping):
        return list(tensors.values())
    return list(tensors)


# -- the autograd graph ---------------------------------------------------------------------------

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
    ``sum_t L_t`` carries exactly ``dL_t/dZ_k`` on task ``t``'s taps into feature ``k``.
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


# -- per-task gradients ---------------------------------------------------------------------------

def _freed(exc: RuntimeError) -> bool:
    return "second time" in str(exc)


def iter_task_grads(losses: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool = True,
                    create_graph: bool | Collection[int] = False, names: Sequence[str] | None = None,
                    ) -> Iterator[Grads]:
    """One reverse pass per task: yields ``dL_t/d(inputs)`` for each loss in turn.

    ``None`` stands for an input the loss does not reach (every entry, for a loss without a
    graph). ``retain_graph=False`` frees the graph with the last task's pass (earlier ones always
    keep it). ``create_graph`` is a bool or the positions of the tasks whose gradients get a graph
    (for double backward). A graph freed before the call (the training backward already ran)
    raises a ``RuntimeError`` naming the task (from ``names``, else its position).
    """
    n_live = sum(loss.requires_grad for loss in losses)
    n_done = 0
    for t, loss in enumerate(losses):
        if not loss.requires_grad:
            yield (None,) * len(inputs)
            continue
        n_done += 1
        graph = create_graph if isinstance(create_graph, bool) else t in create_graph
        try:
            grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph or n_done < n_live,
                                        create_graph=graph, allow_unused=True)
        except RuntimeError as exc:
            if _freed(exc):
                name = names[t] if names is not None else t
                raise RuntimeError(f"the graph of task {name!r}'s loss was already freed; compute diagnostics "
                                   "and per-task gradients before the training backward pass (or retain its "
                                   "graph)") from exc
            raise
        yield grads


def _one_pass(losses: Sequence[Tensor], feats: list[Tensor], taps: list[list[tuple[Any, int, int]]],
              heads: list[Tensor], create_graph: bool, record: Callable[[int, int, Tensor], None]) -> Grads:
    """One reverse pass of ``sum_t L_t`` to ``feats + heads``; hooks on the nodes that hold taps hand
    each task's share of every feature's gradient to ``record(task, feature, grad)`` as the pass
    makes it. Returns the heads' gradients. (A share ``record`` does not keep is freed at once, so
    the engine can sum the features' gradients in place.)"""
    by_node: dict[Any, list[tuple[int, int, int]]] = {}  # node -> [(input slot, task, feature)]
    for t, task in enumerate(taps):
        for node, slot, k in task:
            by_node.setdefault(node, []).append((slot, t, k))

    def make_hook(targets: list[tuple[int, int, int]]):
        def hook(grad_inputs, grad_outputs):
            for slot, t, k in targets:
                g = grad_inputs[slot]
                if g is not None:
                    record(t, k, g)
        return hook

    live = [loss if loss.ndim == 0 else loss.reshape(()) for loss in losses if loss.requires_grad]
    grads: Grads = [None] * (len(feats) + len(heads))
    handles = [node.register_hook(make_hook(targets)) for node, targets in by_node.items()]
    try:
        if live:
            grads = torch.autograd.grad(torch.stack(live).sum(), feats + heads, retain_graph=True,
                                        create_graph=create_graph, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return grads[len(feats):]


def task_feature_grads(losses: Sequence[Tensor], feats: Sequence[Tensor], create_graph: bool = False,
                       with_heads: bool = True, names: Sequence[str] | None = None,
                       ) -> tuple[list[list[Tensor | None]], list[Tensor], list[list[Tensor | None]]]:
    """Per-task gradients w.r.t. the shared features and the task-specific leaves (the heads).

    Returns ``(feature_grads, heads, head_grads)``: ``feature_grads[t][k] = dL_t/dZ_k``, the
    leaves the losses reach without passing through the features, and ``head_grads[t][j] =
    dL_t/dphi_j`` (``None`` where unused). When the heads' graphs are disjoint (each task's own
    head, see :func:`feature_taps`) ONE backward of ``sum_t L_t`` through the heads gives all of
    them; otherwise (or when the graph was freed, for the error naming the task) one backward per
    task. The graph is kept (the trunk's backward comes next); ``create_graph`` also records the
    graph of the returned gradients (for double backward). ``with_heads=False`` skips the heads'
    gradients (``heads`` and ``head_grads`` come back empty).
    """
    feats = list(feats)
    found = feature_taps(losses, feats)
    if found is not None:
        taps, leaves = found
        leaves = leaves if with_heads else []
        heads = [leaf for leaf, _ in leaves]
        feature_grads: list[list[Tensor | None]] = [[None] * len(feats) for _ in losses]

        def keep(t: int, k: int, g: Tensor) -> None:
            feature_grads[t][k] = g if feature_grads[t][k] is None else feature_grads[t][k] + g

        try:
            grads = _one_pass(losses, feats, taps, heads, create_graph, keep)
        except RuntimeError as exc:
            if not _freed(exc):
                raise
        else:
            head_grads: list[list[Tensor | None]] = [[None] * len(heads) for _ in losses]
            for j, (g, (_, t)) in enumerate(zip(grads, leaves)):
                head_grads[t][j] = g
            return feature_grads, heads, head_grads
    heads = graph_leaves(losses, stop=feats) if with_heads else []
    feature_grads, head_grads = [], []
    for grads in iter_task_grads(losses, feats + heads, create_graph=create_graph, names=names):
        feature_grads.append(list(grads[:len(feats)]))
        head_grads.append(list(grads[len(feats):]))
    return feature_grads, heads, head_grads


# -- the task Jacobian as a T x P matrix ----------------------------------------------------------

def check_gradient_args(losses: Mapping[str, Tensor], wrt: TensorArg) -> list[Tensor]:
    """Validate the arguments of :func:`task_gradients`; return ``wrt`` as a list."""
    if not losses:
        raise ValueError("losses is empty; expected at least one task loss")
    inputs = as_tensor_list(wrt)
    if not inputs:
        raise ValueError("wrt is empty; expected the shared parameters or feature tensors")
    for k, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise ValueError(f"wrt[{k}] is a {type(t).__name__}; expected a torch.Tensor")
        if not t.requires_grad:
            raise ValueError(f"wrt[{k}] (shape {tuple(t.shape)}) does not require grad; pass parameters, or "
                             "features from a forward pass run with grad enabled")
    for name, loss in losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss of task {name!r} must be a scalar tensor, got {shape}")
    return inputs


def task_gradients_into(out: Tensor, losses: Mapping[str, Tensor], inputs: list[Tensor],
                        retain_graph: bool) -> Tensor:
    """Write dL_i/d(inputs) into row i of ``out`` ([T, P], every row overwritten); return ``out``.

    One reverse pass per task, each row written as soon as it is taken. A single vmap-batched pass
    (``is_grads_batched=True`` on the stacked losses) gives the same rows but was measured slower
    on CPU for the benchmark models (benchmarks/results/diagnostics.md), so it is not used.
    """
    losses_0d = [loss.reshape(()) for loss in losses.values()]
    for row, grads in zip(out, iter_task_grads(losses_0d, inputs, retain_graph, names=list(losses))):
        start = 0
        for x, g in zip(inputs, grads):
            part = row[start:start + x.numel()]
            if g is None:
                part.zero_()
            else:
                part.view_as(g).copy_(g)
            start += x.numel()
    return out


def feature_gradients_one_pass(out: Tensor, losses: Mapping[str, Tensor], features: list[Tensor]) -> bool:
    """Fill ``out`` ([T, N]) with dL_i/d(features) from ONE reverse pass of the summed losses, when
    that is exact (each task reaches the features through its own head, :func:`feature_taps`);
    else return False without touching ``out`` (unless the graph turns out to be freed: then one
    pass per task names the task in its error). Each task's share is added into ``out`` as the pass
    makes it. Same numbers as one pass per task (bit for bit when a task feeds each feature through
    one node), without the T - 1 extra engine runs.
    """
    loss_list = list(losses.values())
    found = feature_taps(loss_list, features)
    if found is None:
        return False
    offsets = [0]
    for z in features:
        offsets.append(offsets[-1] + z.numel())

    def add(t: int, k: int, g: Tensor) -> None:
        out[t, offsets[k]:offsets[k + 1]].view_as(g).add_(g)

    out.zero_()
    try:
        _one_pass(loss_list, features, found[0], [], False, add)
    except RuntimeError as exc:
        if _freed(exc):
            return False
        raise
    return True


def task_gradients(losses: Mapping[str, Tensor], wrt: TensorArg, retain_graph: bool = True) -> Tensor:
    """Per-task gradients, flattened and stacked: row i is dL_i/d(wrt), shape ``[T, P]``.

    ``wrt`` is the shared parameters (P = their total size) or the shared feature tensors (P = all
    their elements, batch included). Tensors a loss does not reach get zero gradient; a loss with
    no graph (e.g. a task with no valid label in the batch) gets a zero row.

    Args:
        losses: task name -> scalar loss; row order follows the mapping.
        wrt: tensors requiring grad, concatenated in the given order along P.
        retain_graph: keep the autograd graph after the last task's pass (the default), so that the
            caller can still run the training backward on the same losses. With ``False`` the graph
            is freed by the last differentiation (earlier ones always retain it).

    The result is detached and costs T x P memory; ``.grad`` of ``wrt`` is left untouched.
    """
    inputs = check_gradient_args(losses, wrt)
    out = torch.empty(len(losses), sum(t.numel() for t in inputs), dtype=inputs[0].dtype, device=inputs[0].device)
    return task_gradients_into(out, losses, inputs, retain_graph)


__all__ = ["graph_leaves", "feature_taps", "iter_task_grads", "task_feature_grads", "task_gradients",
           "task_gradients_into", "feature_gradients_one_pass", "check_gradient_args", "as_tensor_list"]
