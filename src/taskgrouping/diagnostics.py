"""Diagnostics of multi-task training: how task gradients and feature saliencies relate.

The measures of Mao et al. (2024), "Robust Analysis of Multi-Task Learning Efficiency":

* **GDS** (gradient direction similarity): mean over ordered task pairs i != j of
  cos(g_i, g_j). 1 = all tasks pull the shared weights the same way, -1 = opposite (T = 2).
* **GMS** (gradient magnitude similarity): mean over i != j of
  2 ||g_i|| ||g_j|| / (||g_i||^2 + ||g_j||^2). 1 = equal norms; a norm ratio r gives 2r / (1 + r^2).
  The paper prints ||g_i||^2 + ||g_j||^2 with a typo in the denominator; this is the corrected form.
* **FD** (feature disentanglement): with the saliency s_ij = |dL_i / dZ_j| of task i at position j
  of the shared features Z, p_ij = s_ij / sum_k s_kj and FD = mean_j of -sum_i p_ij log p_ij
  (natural log, so 0 <= FD <= log T). Lower = each feature element serves fewer tasks.
* **Ranking similarity**: the fraction of ordered item pairs on which two rankings agree; the
  paper reports |S - 0.5| to judge how faithfully an identifier (e.g. FD) orders methods the way
  their test performance does, whichever direction the correlation has.

Here g_i is the gradient of task i's loss w.r.t. the shared parameters ("param" level) or w.r.t.
the shared features Z (the cheap "feature" level that the fast gradient surrogate uses). Feature
gradients are kept per sample: g_i is the whole tensor dL_i/dZ flattened, batch dimension
included, never summed over the batch. The losses are taken as given (unweighted by any
balancer): the measures describe the tasks, not a method's weighting of them.

Everything is computed with :func:`torch.autograd.grad` (``create_graph=False``), which returns
gradients instead of accumulating them, so the parameters' ``.grad`` is never read or written.
:class:`DiagnosticsCallback` uses this to log the measures during training without changing the
training run: the trainer calls it after the forward pass and *before* the step's backward pass,
while the graph still exists (``train(..., callbacks=[DiagnosticsCallback(every=10)])``).

Cost per measurement (benchmarks/results/diagnostics.md): at the param level one reverse pass per
task through the shared trunk, which no implementation of exact per-task parameter gradients can
avoid; at the feature level, when each task reaches the features through its own head, a single
reverse pass through the heads whose per-task shares are recorded by hooks, else one per task.
The measures' own arithmetic works in place on one T x P matrix, and the callback keeps that
matrix between measurements instead of allocating it afresh.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from taskgrouping.balancing.jacobian import feature_taps
from taskgrouping.engine.hooks import CallbackBase

MEASURES: tuple[str, ...] = ("gds", "gms", "fd")
_LABELS = {
    "gds": "GDS (gradient direction similarity)",
    "gms": "GMS (gradient magnitude similarity)",
    "fd": "FD (task entropy per feature, nats)",
}

Level = Literal["param", "feature"]
FeatureArg = Tensor | Sequence[Tensor] | Mapping[Any, Tensor] | None


# -- per-task gradients ---------------------------------------------------------------------------

def _as_tensor_list(tensors: FeatureArg) -> list[Tensor]:
    if tensors is None:
        return []
    if isinstance(tensors, Tensor):
        return [tensors]
    if isinstance(tensors, Mapping):
        return list(tensors.values())
    return list(tensors)


def _check_gradient_args(losses: Mapping[str, Tensor], wrt: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Validate the arguments of :func:`task_gradients`; return ``wrt`` as a list."""
    if not losses:
        raise ValueError("losses is empty; expected at least one task loss")
    inputs = _as_tensor_list(wrt)
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


def _task_gradients_into(out: Tensor, losses: Mapping[str, Tensor], inputs: list[Tensor],
                         retain_graph: bool) -> Tensor:
    """Write dL_i/d(inputs) into row i of ``out`` ([T, P], every row overwritten); return ``out``.

    One reverse pass per task. A single vmap-batched pass (``is_grads_batched=True`` on the stacked
    losses) gives the same rows but was measured slower on CPU for the benchmark models
    (benchmarks/results/diagnostics.md), so it is not used.
    """
    n_live = sum(loss.requires_grad for loss in losses.values())
    n_done = 0
    for i, (name, loss) in enumerate(losses.items()):
        if not loss.requires_grad:
            out[i].zero_()
            continue
        n_done += 1
        try:
            grads = torch.autograd.grad(loss.reshape(()), inputs, retain_graph=retain_graph or n_done < n_live,
                                        create_graph=False, allow_unused=True, materialize_grads=True)
        except RuntimeError as exc:
            if "second time" in str(exc):
                raise RuntimeError(f"the graph of task {name!r}'s loss was already freed; compute "
                                   "diagnostics before the training backward pass (or retain its graph)") from exc
            raise
        start = 0
        for g in grads:
            out[i, start:start + g.numel()].view_as(g).copy_(g)
            start += g.numel()
    return out


def _feature_gradients_one_pass(out: Tensor, losses: Mapping[str, Tensor], features: list[Tensor]) -> bool:
    """Fill ``out`` ([T, N]) with dL_i/d(features) from ONE reverse pass of the summed losses, when
    that is exact; else return False (without touching ``out``, unless the graph turns out to be
    freed) and leave the rows to one pass per task.

    It is exact when every task reaches the features only through its own part of the graph (its
    head; checked by :func:`taskgrouping.balancing.jacobian.feature_taps`): the reverse pass of
    sum_i L_i then runs each part once, with seed 1, and what task i's part sends along its edges
    into the features is exactly dL_i/dZ. A hook on each node that feeds the features records that
    share before the engine adds the tasks together. Same numbers as one pass per task (bit for bit
    when a task feeds each feature through one node), without the T - 1 extra engine runs.
    """
    loss_list = list(losses.values())
    found = feature_taps(loss_list, features)
    if found is None:
        return False
    offsets = [0]
    for z in features:
        offsets.append(offsets[-1] + z.numel())
    taps: dict[Any, list[tuple[int, int, int]]] = {}  # node feeding a feature -> [(input slot, task, feature)]
    for i, task_taps in enumerate(found[0]):
        for node, slot, k in task_taps:
            taps.setdefault(node, []).append((slot, i, k))
    live = [loss.reshape(()) for loss, task_taps in zip(loss_list, found[0]) if task_taps]
    out.zero_()
    if not live:
        return True

    def make_hook(targets: list[tuple[int, int, int]]):
        def hook(grad_inputs, grad_outputs):
            for slot, i, k in targets:
                g = grad_inputs[slot]
                if g is not None:
                    out[i, offsets[k]:offsets[k + 1]].view_as(g).add_(g)
        return hook

    handles = [node.register_hook(make_hook(targets)) for node, targets in taps.items()]
    try:
        torch.autograd.grad(live, features, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        if "second time" in str(exc):
            return False  # a freed graph: the per-task passes name the task in their error
        raise
    finally:
        for h in handles:
            h.remove()
    return True


def task_gradients(losses: Mapping[str, Tensor], wrt: Tensor | Sequence[Tensor],
                   retain_graph: bool = True) -> Tensor:
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
    inputs = _check_gradient_args(losses, wrt)
    out = torch.empty(len(losses), sum(t.numel() for t in inputs), dtype=inputs[0].dtype, device=inputs[0].device)
    return _task_gradients_into(out, losses, inputs, retain_graph)


def task_saliency(losses: Mapping[str, Tensor], features: Tensor | Sequence[Tensor],
                  retain_graph: bool = True) -> Tensor:
    """Saliency |dL_i/dZ_j| of every task at every feature element, shape ``[T, N]``."""
    return task_gradients(losses, features, retain_graph=retain_graph).abs_()


# -- gradient similarity --------------------------------------------------------------------------

def _gram(G: Tensor, name: str) -> np.ndarray:
    """Validated Gram matrix G G^T of per-task gradients ``[T, P]``, as a float64 NumPy ``[T, T]``.

    The product runs in the gradients' dtype (float32 for float32 gradients: one pass over the
    T x P matrix, no float64 copy of it) and is cast afterwards. Only the T x T result is checked
    for NaN/inf (a non-finite gradient makes its Gram row non-finite), which keeps the check cheap
    for millions of parameters. The T x T arithmetic that follows runs in NumPy, where each small
    operation costs a few microseconds less than a torch dispatch.
    """
    if not isinstance(G, Tensor):
        G = torch.as_tensor(np.asarray(G, dtype=np.float64))
    if G.dim() != 2:
        raise ValueError(f"{name} expects per-task gradients of shape [T, P], got shape {tuple(G.shape)}")
    if G.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 tasks (rows), got {G.shape[0]}")
    G = G.detach()
    if not G.is_floating_point():
        G = G.to(torch.float64)
    gram = (G @ G.T).to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(gram).all():
        raise ValueError(f"{name}: the gradients contain NaN or inf (or overflow when squared)")
    return gram


def _off_diagonal_mean(M: np.ndarray) -> float:
    off = M[~np.eye(M.shape[0], dtype=bool)]
    defined = off[~np.isnan(off)]
    return float(defined.mean()) if defined.size else math.nan


def _cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    return np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), np.nan)


def _magnitude_from_gram(gram: np.ndarray) -> np.ndarray:
    sq = np.clip(np.diag(gram), 0.0, None)
    norms = np.sqrt(sq)
    denom = sq[:, None] + sq[None, :]
    return np.where(denom > 0, 2 * np.outer(norms, norms) / np.where(denom > 0, denom, 1.0), np.nan)


def _device_of(G: Any) -> torch.device:
    return G.device if isinstance(G, Tensor) else torch.device("cpu")


def gradient_direction_matrix(G: Tensor) -> Tensor:
    """Pairwise cosine similarities cos(g_i, g_j), ``[T, T]`` float64.

    Entries involving a zero gradient are undefined and set to NaN.
    """
    return torch.as_tensor(_cosine_from_gram(_gram(G, "gradient_direction_matrix")), device=_device_of(G))


def gradient_magnitude_matrix(G: Tensor) -> Tensor:
    """Pairwise magnitude similarities 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2), ``[T, T]`` float64.

    A zero gradient against a non-zero one scores 0; two zero gradients are undefined (NaN).
    """
    return torch.as_tensor(_magnitude_from_gram(_gram(G, "gradient_magnitude_matrix")), device=_device_of(G))


def gradient_direction_similarity(G: Tensor) -> float:
    """GDS: mean cosine similarity over ordered pairs i != j of the rows of ``G`` ([T, P]).

    Pairs involving a zero gradient are left out; NaN when no pair is defined.
    """
    return _off_diagonal_mean(_cosine_from_gram(_gram(G, "gradient_direction_similarity")))


def gradient_magnitude_similarity(G: Tensor) -> float:
    """GMS: mean of 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2) over ordered pairs i != j of the rows of ``G``.

    Pairs of two zero gradients are left out; NaN when no pair is defined.
    """
    return _off_diagonal_mean(_magnitude_from_gram(_gram(G, "gradient_magnitude_similarity")))


# -- feature disentanglement ----------------------------------------------------------------------

def _mean_task_entropy_(S: Tensor, work: Tensor | None = None) -> float:
    """Mean over positions with some saliency of the task entropy; ``S`` is [T, N] and >= 0.

    ``S`` is overwritten (with p); ``work`` (contiguous, S's shape and dtype) receives p log p,
    else a temporary is allocated. The T x N work is six passes: column sums, p = s / sum, clamp,
    log, multiply, sum.
    """
    if S.shape[1] == 0:
        return math.nan
    total = S.sum(dim=0)
    if not math.isfinite(float(total.max())):  # S >= 0, so any NaN or inf shows in the largest sum
        raise ValueError("saliency (feature gradients) contains NaN or inf")
    n_used = int(torch.count_nonzero(total))
    if n_used == 0:
        return math.nan
    # Columns with total 0 give p = 0 and entropy 0, so they add nothing to the sum; dividing by
    # the number of used columns leaves them out of the mean without copying the used ones.
    p = S.div_(torch.where(total > 0, total, 1.0))
    tiny = torch.finfo(p.dtype).tiny
    plogp = p.clamp_min(tiny) if work is None else torch.clamp_min(p, tiny, out=work)
    plogp.log_().mul_(p)  # exactly 0 at p = 0 and p = 1
    return float(-plogp.sum(dim=0).sum(dtype=torch.float64) / n_used)


def feature_disentanglement_from_saliency(saliency: Tensor) -> float:
    """FD from a saliency tensor ``[T, ...]`` (task first, any feature positions after).

    At each position j, p_ij = s_ij / sum_k s_kj and H_j = -sum_i p_ij log p_ij (natural log,
    0 log 0 = 0); FD is the mean of H_j over positions. Positions where every task's saliency is
    0 carry no task at all, so they have no distribution over tasks and are left out of the mean
    (NaN when no position is left). Range [0, log T]: 0 when each position serves one task,
    log T when all tasks are equally salient everywhere. Computed in the saliency's floating
    dtype (float32 gives about 1e-6 relative precision).
    """
    if not isinstance(saliency, Tensor):
        saliency = torch.as_tensor(np.asarray(saliency, dtype=np.float64))
    if saliency.dim() < 2:
        raise ValueError(f"saliency must have shape [T, positions...], got shape {tuple(saliency.shape)}")
    S = saliency.detach().reshape(saliency.shape[0], -1)
    if not S.is_floating_point():
        S = S.to(torch.float64)
    if (S < 0).any():
        raise ValueError("saliency must be non-negative (absolute gradients); got negative entries")
    return _mean_task_entropy_(S.clone())


def feature_disentanglement(losses: Mapping[str, Tensor], features: Tensor | Sequence[Tensor],
                            retain_graph: bool = True) -> float:
    """FD of the task losses on the shared features (all elements, batch included); see
    :func:`feature_disentanglement_from_saliency`."""
    return _mean_task_entropy_(task_gradients(losses, features, retain_graph=retain_graph).abs_())


# -- ranking similarity ---------------------------------------------------------------------------

def _as_vector(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"ranking_similarity: {name} must be 1-D (one score or rank per item), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"ranking_similarity: {name} contains NaN or inf")
    return v


def ranking_similarity(a: Any, b: Any) -> float:
    """Fraction of ordered item pairs (i, j), i != j, on which ``a`` and ``b`` order i and j alike.

    ``a`` and ``b`` are per-item scores or ranks in the *same orientation* (compare ranks with
    ranks; negate one vector if its "better" direction is opposite). A pair agrees when
    sign(a_i - a_j) == sign(b_i - b_j); so a tie agrees only with a tie, and a tie in one vector
    against a strict order in the other counts as a disagreement. Without ties this equals
    (1 + Kendall's tau) / 2. 1 = same order, 0 = reversed order, 0.5 = unrelated.
    """
    u, v = _as_vector(a, "a"), _as_vector(b, "b")
    if u.shape != v.shape:
        raise ValueError(f"ranking_similarity: a has {u.size} items but b has {v.size}; expected the same items")
    n = u.size
    if n < 2:
        raise ValueError(f"ranking_similarity needs at least 2 items, got {n}")
    su = np.sign(u[:, None] - u[None, :])
    sv = np.sign(v[:, None] - v[None, :])
    agree = (su == sv) & ~np.eye(n, dtype=bool)
    return float(agree.sum() / (n * (n - 1)))


def ranking_similarity_gap(a: Any, b: Any) -> float:
    """|S - 0.5| with S = :func:`ranking_similarity`: how far from unrelated, in either direction."""
    return abs(ranking_similarity(a, b) - 0.5)


# -- all measures at once -------------------------------------------------------------------------

def _check_measures(measures: Sequence[str]) -> tuple[str, ...]:
    if isinstance(measures, str):
        measures = (measures,)
    ms = tuple(str(m).lower() for m in measures)
    if not ms:
        raise ValueError(f"measures is empty; expected some of {MEASURES}")
    bad = [m for m in ms if m not in MEASURES]
    if bad:
        raise ValueError(f"unknown measure(s) {bad}; expected some of {MEASURES}")
    if len(set(ms)) != len(ms):
        raise ValueError(f"measures lists a measure twice: {list(ms)}")
    return ms


_SCRATCH_MAX_BYTES = 64 * 2**20


class _Scratch:
    """Work buffers that :class:`DiagnosticsCallback` keeps from one measurement to the next.

    A measurement needs a T x P gradient matrix and a T x N temporary for FD. Allocating them
    afresh every time costs page faults (fresh memory from the OS) that, at the sizes of a small
    model, take as long as the arithmetic itself; keeping them avoids that. A buffer over
    ``_SCRATCH_MAX_BYTES`` is allocated per measurement instead of kept: holding that much memory
    between measurements would cost more than the allocation saves.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, key: str, rows: int, cols: int, like: Tensor) -> Tensor:
        """A contiguous ``[rows, cols]`` tensor of ``like``'s dtype and device (contents undefined)."""
        n = rows * cols
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            if n * buf.element_size() <= _SCRATCH_MAX_BYTES:
                self._buffers[key] = buf
        return buf[:n].view(rows, cols)


def _diagnose(losses: Mapping[str, Tensor], shared_params: Sequence[Tensor] | None, features: FeatureArg,
              level: Level, measures: Sequence[str], scratch: _Scratch | None) -> dict[str, float]:
    ms = _check_measures(measures)
    if level not in ("param", "feature"):
        raise ValueError(f"level must be 'param' or 'feature', got {level!r}")
    feats = _as_tensor_list(features)
    params = _as_tensor_list(shared_params)
    wants_grads = "gds" in ms or "gms" in ms
    if ("fd" in ms or (wants_grads and level == "feature")) and not feats:
        raise ValueError("features are needed for FD and for level='feature'; pass the shared feature tensors")
    if wants_grads and level == "param" and not params:
        raise ValueError("shared_params are needed for GDS/GMS at level='param'")
    use_params = wants_grads and level == "param"
    wrt = (params if use_params else []) + (feats if ("fd" in ms or not use_params) else [])
    inputs = _check_gradient_args(losses, wrt)
    T, P = len(losses), sum(t.numel() for t in inputs)
    G = (torch.empty(T, P, dtype=inputs[0].dtype, device=inputs[0].device) if scratch is None
         else scratch.get("gradients", T, P, inputs[0]))
    if use_params or not _feature_gradients_one_pass(G, losses, inputs):
        _task_gradients_into(G, losses, inputs, retain_graph=True)
    n_params = sum(p.numel() for p in params) if use_params else 0
    # The Gram is taken before FD turns the feature columns of G into saliencies in place.
    gram = _gram(G[:, :n_params] if use_params else G, "diagnose") if wants_grads else None
    out: dict[str, float] = {}
    for m in ms:
        if m == "gds":
            out[m] = _off_diagonal_mean(_cosine_from_gram(gram))
        elif m == "gms":
            out[m] = _off_diagonal_mean(_magnitude_from_gram(gram))
        else:
            S = G[:, n_params:].abs_()
            work = None if scratch is None else scratch.get("entropy", T, S.shape[1], S)
            out[m] = _mean_task_entropy_(S, work)
    return out


def diagnose(losses: Mapping[str, Tensor], shared_params: Sequence[Tensor] | None = None,
             features: FeatureArg = None, level: Level = "param",
             measures: Sequence[str] = MEASURES) -> dict[str, float]:
    """The requested measures for one batch.

    GDS/GMS use gradients w.r.t. ``shared_params`` (``level="param"``) or ``features``
    (``level="feature"``); FD always uses ``features``. Parameters and features are
    differentiated together, one reverse pass per task, so FD costs nothing extra at the param
    level. With features alone, a single reverse pass serves all tasks when each task reaches the
    features through its own head (see :func:`_feature_gradients_one_pass`), else one per task.
    The graph is retained.
    """
    return _diagnose(losses, shared_params, features, level, measures, scratch=None)


# -- training callback ----------------------------------------------------------------------------

class DiagnosticsCallback(CallbackBase):
    """Logs GDS / GMS / FD every ``every`` steps during training, without changing the run.

    Follows the trainer's callback protocol (:func:`taskgrouping.engine.trainer.train`): the trainer calls
    ``on_step(step, output, model, batch)`` after the forward pass and *before* the step's backward
    pass, while the graph still exists. The losses are ``output.losses``, the shared parameters
    ``model.shared_parameters()`` (needed at ``level="param"`` for GDS/GMS) and the features the
    heads read ``output.features`` (needed for FD and at ``level="feature"``). Gradients come from
    :func:`torch.autograd.grad` with ``retain_graph=True, create_graph=False``, so ``.grad``, the
    optimiser, the RNG and the training trajectory are unchanged. Cost per measurement: one
    backward pass per task through the shared trunk at ``level="param"``; one pass through the
    heads at ``level="feature"`` (one per task when the tasks' heads share graph nodes). The
    callback keeps its two work buffers (T x P and T x N floats) between measurements when each is
    at most 64 MiB.

    ``on_epoch_end(epoch)`` tags the entries logged during the epoch with ``"epoch"`` and returns
    ``{"diagnostics": {...}}`` (merged by the trainer into the epoch's log record): the latest
    entry and the mean of each measure over the epoch's entries.

    Attributes:
        history: one dict per measured step, ``{"step": int, <measure>: float, ...}`` with the
            requested measures (NaN where undefined, e.g. all task gradients zero), plus
            ``"epoch"`` once that epoch has ended.
    """

    def __init__(self, every: int = 10, level: Level = "param", measures: Sequence[str] = MEASURES) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (steps between measurements), got {every!r}")
        if level not in ("param", "feature"):
            raise ValueError(f"level must be 'param' or 'feature', got {level!r}")
        self.every = every
        self.level: Level = level
        self.measures = _check_measures(measures)
        self.history: list[dict[str, Any]] = []
        self._epoch_start = 0  # index of the first history entry of the running epoch
        self._scratch = _Scratch()

    @property
    def needs_shared_parameters(self) -> bool:
        """True when the model must provide ``shared_parameters()`` (GDS/GMS at the param level)."""
        return self.level == "param" and ("gds" in self.measures or "gms" in self.measures)

    @property
    def needs_features(self) -> bool:
        """True when the step output must carry the shared features (FD, or the feature level)."""
        return "fd" in self.measures or self.level == "feature"

    def measure(self, step: int, losses: Mapping[str, Tensor], shared_params: Sequence[Tensor] | None = None,
                features: FeatureArg = None) -> dict[str, Any] | None:
        """Measure at steps divisible by ``every`` from explicit tensors; return the new history
        entry, else None. (:meth:`on_step` is this with the tensors taken from the trainer.)"""
        if step % self.every:
            return None
        entry: dict[str, Any] = {"step": int(step)}
        entry.update(_diagnose(losses, shared_params, features, self.level, self.measures, self._scratch))
        self.history.append(entry)
        return entry

    def on_step(self, step: int, output: Any, model: Any, batch: Any = None) -> dict[str, Any] | None:
        """Trainer hook: measure on ``output.losses`` / ``output.features`` and the model's shared
        parameters at steps divisible by ``every``; return the new history entry, else None."""
        if step % self.every:
            return None
        losses = getattr(output, "losses", None)
        if not isinstance(losses, Mapping):
            raise ValueError(f"DiagnosticsCallback.on_step expects the trainer's StepOutput (with a .losses dict), "
                             f"got {type(output).__name__}")
        shared = None
        if self.needs_shared_parameters:
            if not hasattr(model, "shared_parameters"):
                raise ValueError(f"DiagnosticsCallback(level='param') needs the model's shared parameters for GDS/GMS, "
                                 f"but {type(model).__name__} has no shared_parameters(); use level='feature' or a "
                                 "model that defines it (e.g. BranchedModel)")
            shared = list(model.shared_parameters())
        feats = list((getattr(output, "features", None) or {}).values()) or None
        if self.needs_features and feats is None:
            raise ValueError(f"DiagnosticsCallback (level={self.level!r}, measures {list(self.measures)}) needs the "
                             f"shared features the heads read, but the step output of {type(model).__name__} has none; "
                             "use a model with forward_heads() (e.g. BranchedModel) or measure only GDS/GMS at "
                             "level='param'")
        return self.measure(step, losses, shared, feats)

    def epoch_means(self, epoch: int | None = None) -> dict[str, float]:
        """Mean of each measure over the entries logged during ``epoch`` (NaN entries left out).

        Default: the last ended epoch that has entries (``{}`` if none). Measures with no finite
        value in that epoch are NaN.
        """
        tagged = [h for h in self.history if "epoch" in h]
        if epoch is None:
            if not tagged:
                return {}
            epoch = tagged[-1]["epoch"]
        entries = [h for h in tagged if h["epoch"] == epoch]
        if not entries:
            return {}
        out: dict[str, float] = {}
        for m in self.measures:
            vals = [h[m] for h in entries if m in h and not math.isnan(h[m])]
            out[m] = float(sum(vals) / len(vals)) if vals else math.nan
        return out

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        """Trainer hook: tag this epoch's entries and return ``{"diagnostics": {"epoch", "n_measured",
        "last", "epoch_mean"}}`` (``last`` is the latest entry so far, ``None`` before any)."""
        for h in self.history[self._epoch_start:]:
            h["epoch"] = int(epoch)
        n = len(self.history) - self._epoch_start
        self._epoch_start = len(self.history)
        means = self.epoch_means(epoch) if n else {}
        return {"diagnostics": {
            "epoch": int(epoch), "n_measured": n,
            "last": dict(self.history[-1]) if self.history else None,
            "epoch_mean": {m: (None if math.isnan(v) else v) for m, v in means.items()} if n else None,
        }}

    def plot(self, path: str | Path, name: str = "run") -> Path:
        """Write this run's trajectories (one panel per measure) to ``path``."""
        return plot_trajectories({name: self.history}, path, measures=self.measures)

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "level": self.level, "measures": list(self.measures),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history of a run with the same level and measures (resume)."""
        for key in ("level", "measures", "history"):
            if key not in state:
                raise ValueError(f"diagnostics state lacks key {key!r}; expected every, level, measures, history")
        if state["level"] != self.level:
            raise ValueError(f"diagnostics state has level {state['level']!r} but this callback uses {self.level!r}")
        if tuple(state["measures"]) != self.measures:
            raise ValueError(f"diagnostics state has measures {list(state['measures'])} but this callback "
                             f"uses {list(self.measures)}")
        history = []
        for i, h in enumerate(state["history"]):
            if "step" not in h:
                raise ValueError(f"diagnostics state history[{i}] has no 'step'")
            history.append(dict(h))
        self.history = history
        # Entries of ended epochs carry "epoch"; the rest belong to the running epoch.
        self._epoch_start = next((i for i, h in enumerate(history) if "epoch" not in h), len(history))


# -- plots ----------------------------------------------------------------------------------------

def plot_trajectories(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                      measures: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Trajectory plots in the manner of Mao et al. Figures 3-5: one panel per measure, one line
    per run (measure value against training step). Written with the Agg canvas, no pyplot state.

    Args:
        histories: run name -> history (list of ``{"step", <measure>...}`` dicts).
        path: image file to write (format from the suffix, e.g. ``.png``/``.pdf``); parent
            directories are created.
        measures: panels to draw; default every measure present in some history.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not histories:
        raise ValueError("histories is empty; expected {run_name: history}")
    for run, hist in histories.items():
        for i, h in enumerate(hist):
            if "step" not in h:
                raise ValueError(f"history of run {run!r}: entry {i} has no 'step'")
    if measures is None:
        present = {k for hist in histories.values() for h in hist for k in h}
        ms = tuple(m for m in MEASURES if m in present)
        if not ms:
            raise ValueError(f"no history holds any of the measures {MEASURES}")
    else:
        ms = _check_measures(measures)
    fig = Figure(figsize=(4.2 * len(ms), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ms), squeeze=False)[0]
    for ax, m in zip(axes, ms):
        for run, hist in histories.items():
            pts = [(h["step"], h[m]) for h in hist if m in h]
            if pts:
                steps, values = zip(*sorted(pts))
                ax.plot(steps, values, label=str(run), linewidth=1.4)
        ax.set_title(_LABELS[m], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


__all__ = [
    "MEASURES", "task_gradients", "task_saliency", "gradient_direction_matrix", "gradient_magnitude_matrix",
    "gradient_direction_similarity", "gradient_magnitude_similarity", "feature_disentanglement",
    "feature_disentanglement_from_saliency", "ranking_similarity", "ranking_similarity_gap", "diagnose",
    "DiagnosticsCallback", "plot_trajectories",
]
