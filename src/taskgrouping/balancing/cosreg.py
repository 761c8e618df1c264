"""CosReg: orthogonal-gradient regularisation (Suteu & Guo 2019), a penalty on the task
gradients' pairwise cosines differentiated through the gradients (double backward).

The per-task gradients come from :mod:`taskgrouping.balancing.task_gradients` (one pass through
the heads at feature level); the penalty's gradient has a closed form, so the update takes ONE more
backward (see :class:`CosReg`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from taskgrouping.balancing.base import Balancer, register_balancer
from taskgrouping.balancing.gradient_balancer import check_losses, same_features_everywhere
from taskgrouping.balancing.task_gradients import iter_task_grads, task_feature_grads


@register_balancer("cosreg")
class CosReg(Balancer):
    """Orthogonal-gradient regularisation (Suteu & Guo 2019): minimise
    ``sum_t L_t + lam * sum_{i<j} cos^2(g_i, g_j)``, where ``g_t`` is task ``t``'s gradient w.r.t.
    the shared parameters (or, with ``feature_level=True``, w.r.t. the shared features, flattened
    whole or summed over the batch per ``feature_reduction``). The penalty is differentiated
    through the gradients (double backward).

    Cost: ``dP/dg`` has a closed form (:meth:`penalty_and_row_grads`), so with ``v_t = lam dP/dg_t``
    the update is ``sum_t dL_t/dtheta + sum_t H_t v_t`` (``H_t = d g_t / d theta``): ONE backward
    seeded with ``v_t`` at each ``g_t`` gives the second-order part. At feature level the ``g_t``
    come from ONE pass through the heads when each task has its own
    (:func:`~taskgrouping.balancing.task_gradients.task_feature_grads`) and the step costs about an EW
    step. At parameter level every ``g_t`` takes its own backward and the ``T`` Hessian-vector
    products cost about three more backward passes each, so the exact step costs about 17 x EW
    (``hvp_tasks=1``: about 7.8 x EW; benchmarks/results/balancers.md). The first-order part is
    seeded in the same backward as the second-order one, whose traversal of the network it shares
    (as fast, measured, as summing the per-task gradients instead).

    ``hvp_tasks=m`` (parameter level only) takes the Hessian-vector products of ``m`` tasks per
    step, drawn uniformly without replacement, scaled by ``T / m``; the other tasks' gradients
    are plain backward passes (no ``create_graph``). All rows, hence the penalty and every
    ``v_t``, stay exact; only which ``H_t v_t`` enter is random, and each task is drawn with
    probability ``m / T``, so ``E[(T/m) sum_{t in S} H_t v_t] = sum_t H_t v_t``: the update is an
    unbiased estimate of the exact one (``m = T`` is the exact update). The draw of step ``k`` comes
    from ``numpy.random.default_rng([seed, k])``; ``k`` is the balancer's state
    (:meth:`state_dict`), so a resumed run draws what the uninterrupted one would have.

    Under ``torchrun`` the rows (or, at sample level, their Gramian) are summed over the ranks before
    the penalty, and each rank seeds its own rows' graphs with ``dP/dR``: the second-order term adds
    up to the global batch's.
    """

    name = "cosreg"
    needs_grads = True

    def __init__(self, lam: float = 0.1, feature_level: bool = False, feature_reduction: str = "sample",
                 eps: float = 1e-12, hvp_tasks: int | None = None, seed: int = 0) -> None:
        if lam < 0:
            raise ValueError(f"balancer 'cosreg': lam must be >= 0, got {lam}")
        if feature_reduction not in ("sample", "batch"):
            raise ValueError(f"balancer 'cosreg': feature_reduction must be 'sample' or 'batch', "
                             f"got {feature_reduction!r}")
        if hvp_tasks is not None:
            if isinstance(hvp_tasks, bool) or not isinstance(hvp_tasks, (int, np.integer)) or hvp_tasks < 1:
                raise ValueError(f"balancer 'cosreg': hvp_tasks must be an int >= 1 (tasks whose Hessian-vector "
                                 f"product is taken per step) or None (all: the exact update), got {hvp_tasks!r}")
            if feature_level:
                raise ValueError(f"balancer 'cosreg': hvp_tasks={hvp_tasks!r} applies at parameter level only (the "
                                 "feature-level update is already about one EW step); drop it or use "
                                 "feature_level=False")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"balancer 'cosreg': seed must be an int >= 0, got {seed!r}")
        self.lam, self.eps = float(lam), float(eps)
        self.feature_level = bool(feature_level)
        self.uses_features = self.feature_level
        # parameter level: the penalty's Hessian-vector products go back through the whole network
        self.double_backward = not self.feature_level and self.lam > 0
        self.feature_reduction = feature_reduction
        self.hvp_tasks = None if hvp_tasks is None else int(hvp_tasks)
        self.seed = int(seed)
        self._draws = 0
        self._last_penalty = 0.0

    def _row(self, inputs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
        parts = []
        for x, g in zip(inputs, grads):
            g = torch.zeros_like(x) if g is None else g
            if self.feature_level and self.feature_reduction == "batch" and g.ndim > 0:
                g = g.sum(dim=0)
            parts.append(g.reshape(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def penalty_and_row_grads(self, rows: Sequence[Tensor], scale: float = 1.0) -> tuple[float, Tensor]:
        """The penalty ``P = sum_{i<j} cos^2(r_i, r_j)`` and ``scale * dP/dR`` for the stacked task
        gradients ``R`` (T x D), in closed form.

        With ``n_i = max(|r_i|, eps)``, ``C = R R^T / n n^T``, ``A_ij = C_ij / (n_i n_j)`` off the
        diagonal (0 on it) and ``s_i = sum_{j != i} C_ij^2``: ``dP/dR = 2 (A - diag(s / n^2)) R``
        (the ``diag`` term only where ``|r_i| > eps``, as the clamped norm is constant below).
        Written out because autograd would record and replay a handful of ``T x D`` operations
        for it on every step.
        """
        with torch.no_grad():
            jac = torch.stack([r.detach() for r in rows])
            ranks = self.ranks
            if ranks.active and self.feature_level and self.feature_reduction == "sample":
                # rows over this rank's samples: the global rows are their concatenation, whose Gramian
                # is the sum of the ranks' Gramians, and dP/dR restricted to this rank's columns is mix @ R
                gram = ranks.all_sum(jac @ jac.T).double().cpu().numpy()
            else:
                if ranks.active:  # parameter gradients or batch sums: the global rows are the ranks' sums
                    jac = ranks.all_sum(jac.clone())
                gram = (jac @ jac.T).double().cpu().numpy()  # the T x T part in float64 NumPy
        raw = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        norms = np.maximum(raw, self.eps)
        outer = np.outer(norms, norms)
        cos = gram / outer
        np.fill_diagonal(cos, 0.0)
        sq = cos * cos
        shrink = np.where(raw > self.eps, sq.sum(axis=1) / norms ** 2, 0.0)
        mix = (2.0 * scale) * (cos / outer - np.diag(shrink))
        return 0.5 * float(sq.sum()), torch.as_tensor(mix, dtype=jac.dtype, device=jac.device) @ jac

    def _draw(self, n_tasks: int) -> list[int] | None:
        """This step's tasks for the Hessian-vector products (``None``: all of them, exactly)."""
        if self.hvp_tasks is None:
            return None
        if self.hvp_tasks > n_tasks:
            raise ValueError(f"balancer 'cosreg': hvp_tasks={self.hvp_tasks} exceeds the {n_tasks} tasks given; "
                             f"expected 1 <= hvp_tasks <= {n_tasks}")
        rng = np.random.default_rng([self.seed, self._draws])
        self._draws += 1
        return sorted(rng.choice(n_tasks, size=self.hvp_tasks, replace=False).tolist())

    def backward(self, losses, shared_params, features=None):
        return self._backward(losses, shared_params, features, self._draw(len(losses)) if losses else None)

    def _backward(self, losses: dict[str, Tensor], shared_params: Sequence[Tensor],
                  features: Sequence[Tensor] | None, hvp: Sequence[int] | None) -> dict[str, float]:
        """The update with the second-order term taken for the tasks (positions in ``losses``) in
        ``hvp`` only, scaled by ``T / len(hvp)``; ``None`` takes it for all (the exact update)."""
        names, loss_list = check_losses(losses, self.name)
        if self.feature_level:
            inputs = list(features or [])
            if not inputs or not all(isinstance(f, Tensor) and f.requires_grad for f in inputs):
                raise ValueError("balancer 'cosreg' with feature_level=True needs the shared features (in the autograd "
                                 "graph) the heads read; pass them or use feature_level=False")
        else:
            inputs = [p for p in (shared_params or []) if p.requires_grad]
            if not inputs:
                raise ValueError("balancer 'cosreg' needs per-task gradients w.r.t. the shared parameters, but "
                                 "shared_params is empty; pass the trunk's parameters or use feature_level=True")
        if len(loss_list) < 2:
            self._last_penalty = 0.0
            loss_list[0].backward()
            return {"cosreg/penalty": 0.0}
        n = len(loss_list)
        hvp = list(range(n)) if hvp is None else sorted(set(hvp))
        if not hvp or not all(0 <= t < n for t in hvp):
            raise ValueError(f"balancer 'cosreg': hvp tasks must be a non-empty subset of 0..{n - 1}, got {hvp}")
        if self.feature_level and self.feature_reduction == "batch" and self.ranks.active:
            same_features_everywhere(self.ranks, inputs, self.name)  # batch sums of the same features add up
        if self.feature_level:  # one backward through the heads when each task has its own head
            in_grads = task_feature_grads(loss_list, inputs, create_graph=True, with_heads=False, names=names)[0]
        else:  # the graph of g_t only where its Hessian-vector product is taken
            second = set(hvp) if self.lam > 0 else set()
            in_grads = list(iter_task_grads(loss_list, inputs, create_graph=second, names=names))
        rows = [self._row(inputs, grads) for grads in in_grads]
        self._last_penalty, row_grads = self.penalty_and_row_grads(rows, scale=self.lam * n / len(hvp))
        # One backward: sum_t L_t (first order) and, through the graphs that made the sampled rows,
        # (T/m) lam dP/dg_t; both share the network's backward nodes.
        live = [loss for loss in loss_list if loss.requires_grad]
        roots = [torch.stack(live).sum()] if live else []
        seeds = [torch.ones_like(roots[0])] if live else []
        for t in hvp:
            if rows[t].requires_grad and self.lam > 0:
                roots.append(rows[t])
                seeds.append(row_grads[t])
        if roots:
            torch.autograd.backward(roots, grad_tensors=seeds)
        return {"cosreg/penalty": self._last_penalty}

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self._draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        draws = state.get("draws", 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"balancer 'cosreg': state entry 'draws' must be an int >= 0, got {draws!r}")
        self._draws = draws



__all__ = ["CosReg"]
