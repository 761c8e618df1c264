"""The measures of Mao et al. (2024), "Robust Analysis of Multi-Task Learning Efficiency".

* **GDS** (gradient direction similarity): mean over ordered task pairs i != j of
  cos(g_i, g_j). 1 = all tasks pull the shared weights the same way, -1 = opposite (T = 2).
* **GMS** (gradient magnitude similarity): mean over i != j of
  2 ||g_i|| ||g_j|| / (||g_i||^2 + ||g_j||^2). 1 = equal norms; a norm ratio r gives 2r / (1 + r^2).
  The paper prints ||g_i||^2 + ||g_j||^2 with a typo in the denominator; this is the corrected form.
* **FD** (feature disentanglement): with the saliency s_ij = |dL_i / dZ_j| of task i at position j
  of the shared features Z, p_ij = s_ij / sum_k s_kj and FD = mean_j of -sum_i p_ij log p_ij
  (natural log, so 0 <= FD <= log T). Lower = each feature element serves fewer tasks.

Here g_i is the gradient of task i's loss w.r.t. the shared parameters ("param" level) or w.r.t.
the shared features Z (the cheap "feature" level that the fast gradient surrogate uses), taken by
:mod:`taskgrouping.balancing.task_gradients`. Feature gradients are kept per sample: g_i is the
whole tensor dL_i/dZ flattened, batch dimension included. The losses are taken as given
(unweighted by any balancer): the measures describe the tasks, not a method's weighting of them.
Cost per measurement (benchmarks/results/diagnostics.md): one reverse pass per task at the param
level; one pass through the heads at the feature level when each task has its own head.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from taskgrouping.balancing.task_gradients import (TensorArg, as_tensor_list, check_gradient_args,
                                                   feature_gradients_one_pass, task_gradients, task_gradients_into)

MEASURES: tuple[str, ...] = ("gds", "gms", "fd")

Level = Literal["param", "feature"]
FeatureArg = TensorArg


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


# -- all measures at once -------------------------------------------------------------------------

def check_measures(measures: Sequence[str]) -> tuple[str, ...]:
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


class Scratch:
    """Work buffers that :class:`DiagnosticsCallback` keeps from one measurement to the next.

    A measurement needs a T x P gradient matrix and a T x N temporary for FD. Allocating them
    afresh every time costs page faults (fresh memory from the OS) that, at the sizes of a small
    model, take as long as the arithmetic itself; keeping them avoids that. A buffer over
    ``_SCRATCH_MAX_BYTES`` is allocated per measurement instead of kept: holding that much memory
    between measurements would cost more than the allocation saves.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, key: str, rows: int, cols: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A contiguous ``[rows, cols]`` tensor on ``like``'s device, of ``dtype`` (default ``like``'s;
        contents undefined)."""
        n = rows * cols
        dtype = dtype or like.dtype
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=dtype, device=like.device)
            if n * buf.element_size() <= _SCRATCH_MAX_BYTES:
                self._buffers[key] = buf
        return buf[:n].view(rows, cols)


def measure_batch(losses: Mapping[str, Tensor], shared_params: Sequence[Tensor] | None, features: FeatureArg,
                  level: Level, measures: Sequence[str], scratch: Scratch | None) -> dict[str, float]:
    """:func:`diagnose`, with work buffers kept in ``scratch`` (``None``: fresh ones)."""
    ms = check_measures(measures)
    if level not in ("param", "feature"):
        raise ValueError(f"level must be 'param' or 'feature', got {level!r}")
    feats = as_tensor_list(features)
    params = as_tensor_list(shared_params)
    wants_grads = "gds" in ms or "gms" in ms
    if ("fd" in ms or (wants_grads and level == "feature")) and not feats:
        raise ValueError("features are needed for FD and for level='feature'; pass the shared feature tensors")
    if wants_grads and level == "param" and not params:
        raise ValueError("shared_params are needed for GDS/GMS at level='param'")
    use_params = wants_grads and level == "param"
    wrt = (params if use_params else []) + (feats if ("fd" in ms or not use_params) else [])
    inputs = check_gradient_args(losses, wrt)
    T, P = len(losses), sum(t.numel() for t in inputs)
    # at least float32: under bf16 autocast the features are bf16, and a bf16 Gram keeps ~3 digits
    dtype = torch.promote_types(inputs[0].dtype, torch.float32)
    G = (torch.empty(T, P, dtype=dtype, device=inputs[0].device) if scratch is None
         else scratch.get("gradients", T, P, inputs[0], dtype))
    if use_params or not feature_gradients_one_pass(G, losses, inputs):
        task_gradients_into(G, losses, inputs, retain_graph=True)
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
    features through its own head
    (:func:`~taskgrouping.balancing.task_gradients.feature_gradients_one_pass`), else one per task.
    The graph is retained.
    """
    return measure_batch(losses, shared_params, features, level, measures, scratch=None)


__all__ = ["MEASURES", "Level", "FeatureArg", "task_saliency", "gradient_direction_matrix", "gradient_magnitude_matrix",
           "gradient_direction_similarity", "gradient_magnitude_similarity", "feature_disentanglement",
           "feature_disentanglement_from_saliency", "check_measures", "Scratch", "measure_batch", "diagnose"]
