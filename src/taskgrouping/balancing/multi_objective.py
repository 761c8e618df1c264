"""Task weights that solve a multi-objective problem on the task Gramian ``J J^T``.

Registered names: ``mgda`` (the min-norm point of the gradients' convex hull, Sener & Koltun 2018),
``mgda_ub`` (MGDA at feature level), ``cagrad`` (the conflict-averse update, Liu et al. 2021) and
``nash_mtl`` (the Nash bargaining solution, Navon et al. 2022). The problems are solved in float64
NumPy / SciPy (:mod:`~taskgrouping.balancing.gramian_weightings`,
:mod:`~taskgrouping.balancing.solvers`), or by TorchJD's cvxpy solvers with ``solver="cvxpy"``.
MGDA's and CAGrad's weights sum to one (as in the papers and TorchJD).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskgrouping.balancing.base import register_balancer
from taskgrouping.balancing.gradient_balancer import FeatureLevelOnly, GradientBalancer, GramianBalancer, task_gramian
from taskgrouping.balancing.gramian_weightings import mgda_weights
from taskgrouping.balancing.solvers import cagrad_dual, cagrad_weights, nash_mtl_weights
from taskgrouping.balancing.torchjd_adapter import SOLVERS_HINT, TorchJDNashMTL, TorchJDWeights, cvxpy_available

Solver = Literal["scipy", "cvxpy"]


def _tensor(value: Any, name: str, who: str) -> Tensor:
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"balancer {who!r}: state entry {name!r} is not a list of numbers ({exc})") from None


@register_balancer("mgda")
class MGDA(GramianBalancer):
    """MGDA (Desideri 2012; Sener & Koltun 2018, Alg. 2): the min-norm point of the convex hull of
    the task gradients, by the Frank-Wolfe solver. Weights sum to one.

    Computed by :func:`~taskgrouping.balancing.gramian_weightings.mgda_weights` as TorchJD's
    ``MGDAWeighting`` but faster; tests pin them equal."""

    name = "mgda"

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100, **kw: Any) -> None:
        super().__init__(**kw)
        if epsilon <= 0:
            raise ValueError(f"balancer {self.name!r}: epsilon must be > 0, got {epsilon}")
        if max_iters < 1:
            raise ValueError(f"balancer {self.name!r}: max_iters must be >= 1, got {max_iters}")
        self.epsilon, self.max_iters = float(epsilon), int(max_iters)

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        return mgda_weights(gramian, self.epsilon, self.max_iters)


@register_balancer("mgda_ub")
class MGDAUB(FeatureLevelOnly, MGDA):
    """MGDA-UB (Sener & Koltun 2018, Sec. 3.3): MGDA on gradients w.r.t. the shared features,
    which bound the parameter-level problem; always ``feature_level=True``."""

    name = "mgda_ub"


@register_balancer("cagrad")
class CAGrad(GramianBalancer):
    """CAGrad (Liu et al. 2021): the update within ``c * ||g0||`` of the mean gradient ``g0`` that
    maximises the worst task's improvement. Solved on the task Gramian by default
    (``solver="scipy"``: an exact active-set solve of the dual warm-started from the last step's
    solution, with SLSQP as the fallback, :func:`~taskgrouping.balancing.solvers.cagrad_dual`);
    ``solver="cvxpy"`` uses TorchJD's ``CAGradWeighting`` (needs ``pip install taskgrouping[solvers]``).
    ``rescale`` divides the update by ``1 + c**2`` (1, the authors' default), ``1 + c`` (2) or
    nothing (0, TorchJD's convention). The last dual solution is saved by :meth:`state_dict`."""

    name = "cagrad"

    def __init__(self, c: float = 0.4, rescale: int = 1, solver: Solver = "scipy", **kw: Any) -> None:
        super().__init__(**kw)
        if c < 0:
            raise ValueError(f"balancer 'cagrad': c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"balancer 'cagrad': rescale must be 0, 1 or 2, got {rescale}")
        if solver not in ("scipy", "cvxpy"):
            raise ValueError(f"balancer 'cagrad': solver must be 'scipy' or 'cvxpy', got {solver!r}")
        self.c, self.rescale, self.solver = float(c), rescale, solver
        self._torchjd = TorchJDWeights("cagrad", c=self.c) if solver == "cvxpy" else None
        self.dual: np.ndarray | None = None

    def gramian_weights(self, gramian: np.ndarray) -> np.ndarray:
        if self.dual is not None and self.dual.shape[0] != gramian.shape[0]:
            raise ValueError(f"balancer 'cagrad' was set up for {self.dual.shape[0]} tasks but got {gramian.shape[0]}")
        self.dual = cagrad_dual(gramian, self.c, init=self.dual)
        return cagrad_weights(gramian, self.c, dual=self.dual)

    def weights(self, jacobian: Tensor) -> Tensor:
        w = self._torchjd(jacobian) if self._torchjd is not None else super().weights(jacobian)
        return w / {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]

    def state_dict(self) -> dict[str, Any]:
        return {"dual": None if self.dual is None else self.dual.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dual = state.get("dual")
        self.dual = None if dual is None else _tensor(dual, "dual", self.name).numpy()


@register_balancer("nash_mtl")
class NashMTL(GradientBalancer):
    """Nash-MTL (Navon et al. 2022): weights ``alpha`` solving ``G alpha = 1/alpha`` on the
    Frobenius-normalised Gramian (the Nash bargaining solution), then the update is clipped to
    norm ``max_norm`` (0 disables) as the authors clip the shared gradients. ``solver="scipy"``
    (default; exact Newton solve, deterministic) or ``"cvxpy"`` (TorchJD's sequential cvxpy solve;
    needs ``pip install taskgrouping[solvers]``). Weights are recomputed every
    ``update_weights_every`` steps; the last weights warm-start the next solve and are saved by
    :meth:`state_dict`."""

    name = "nash_mtl"

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, solver: Solver = "scipy",
                 **kw: Any) -> None:
        super().__init__(**kw)
        if max_norm < 0:
            raise ValueError(f"balancer 'nash_mtl': max_norm must be >= 0, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(f"balancer 'nash_mtl': update_weights_every must be >= 1, got {update_weights_every}")
        if solver not in ("scipy", "cvxpy"):
            raise ValueError(f"balancer 'nash_mtl': solver must be 'scipy' or 'cvxpy', got {solver!r}")
        if solver == "cvxpy" and not cvxpy_available():
            raise ImportError(f"balancer 'nash_mtl' with solver='cvxpy' needs cvxpy: `{SOLVERS_HINT}`")
        self.max_norm, self.update_every, self.solver = float(max_norm), int(update_weights_every), solver
        self.step = 0
        self.alpha: np.ndarray | None = None
        self._torchjd: TorchJDNashMTL | None = None

    def _solve(self, jacobian: Tensor) -> np.ndarray:
        if self.solver == "cvxpy":
            if self._torchjd is None:
                self._torchjd = TorchJDNashMTL(jacobian.shape[0])
            return self._torchjd(jacobian).double().cpu().numpy()
        return nash_mtl_weights(task_gramian(jacobian), init=self.alpha)

    def weights(self, jacobian: Tensor) -> Tensor:
        t = jacobian.shape[0]
        if self.alpha is not None and self.alpha.shape[0] != t:
            raise ValueError(f"balancer 'nash_mtl' was set up for {self.alpha.shape[0]} tasks but got {t}")
        if self.alpha is None or self.step % self.update_every == 0:
            self.alpha = self._solve(jacobian)
        self.step += 1
        w = torch.as_tensor(self.alpha, dtype=jacobian.dtype, device=jacobian.device)
        if self.max_norm > 0:
            norm = torch.linalg.vector_norm(w @ jacobian)
            if norm > self.max_norm:
                w = w * (self.max_norm / norm)
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else _tensor(alpha, "alpha", self.name).numpy()



__all__ = ["MGDA", "MGDAUB", "CAGrad", "NashMTL"]
