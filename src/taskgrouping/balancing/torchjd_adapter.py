"""The one place that talks to TorchJD (Jacobian descent for PyTorch, version 0.18).

TorchJD's aggregators map a Jacobian ``J`` (tasks x dimensions) to one update vector; most of them
are *Gramian weightings*: a vector of task weights ``w`` computed from ``G = J J^T`` and combined as
``w @ J``. We use the weighting half only, so the same weights serve parameter-level Jacobians and
feature-level ones (where the weights computed from one statistic are applied to another, see
:mod:`taskgrouping.balancing.gradient_balancer`). Everything else in the package sees plain tensors.

Used from TorchJD: IMTL-G, Aligned-MTL and the random weighting (RGW), and CAGrad / Nash-MTL with
``solver="cvxpy"``. PCGrad, GradVac and MGDA are computed by
:mod:`taskgrouping.balancing.gramian_weightings` instead: TorchJD's versions loop over torch
scalar operations, which on a CPU costs more per step than the feature-level surrogate's whole time
budget; ours are the same algorithms (tests pin them equal to TorchJD's, see
:func:`torchjd_aggregator`).

TorchJD's CAGrad and Nash-MTL need cvxpy (and its clarabel / ecos solvers), which we keep as the
optional ``solvers`` extra; asking for them without it raises an ``ImportError`` that says what to
install. Our default for those two methods is a SciPy solver (:mod:`taskgrouping.balancing.solvers`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torchjd import aggregation as jda

SOLVERS_HINT = "pip install taskgrouping[solvers]"

#: Our method name -> factory of the TorchJD weighting it uses.
_GRAMIAN_WEIGHTINGS: dict[str, Callable[..., Any]] = {
    "imtl_g": jda.IMTLGWeighting,
    "aligned_mtl": jda.AlignedMTLWeighting,
    "cagrad": jda.CAGradWeighting,
}
#: Weightings that read the Jacobian itself rather than its Gramian.
_MATRIX_WEIGHTINGS: dict[str, Callable[..., Any]] = {
    "random": jda.RandomWeighting,
}
#: Aggregators (J -> vector) for checking our directions against TorchJD's own.
_AGGREGATORS: dict[str, Callable[..., Any]] = {
    "pcgrad": jda.PCGrad,
    "mgda": jda.MGDA,
    "imtl_g": jda.IMTLG,
    "aligned_mtl": jda.AlignedMTL,
    "gradvac": jda.GradVac,
    "cagrad": jda.CAGrad,
    "random": jda.Random,
    "graddrop": jda.GradDrop,
    "nash_mtl": jda.NashMTL,
}


def _build(table: dict[str, Callable[..., Any]], name: str, options: dict[str, Any]) -> Any:
    if name not in table:
        raise ValueError(f"no TorchJD counterpart named {name!r}; expected one of {sorted(table)}")
    try:
        return table[name](**options)
    except ImportError as exc:
        raise ImportError(f"TorchJD's {name} needs the optional solver packages (cvxpy): "
                          f"`{SOLVERS_HINT}`, or use this balancer's default solver='scipy' ({exc})") from None


class TorchJDWeights:
    """Task weights from a TorchJD weighting: ``TorchJDWeights("imtl_g")(J) -> w`` (one per row).

    Args:
        name: one of ``imtl_g``, ``aligned_mtl``, ``cagrad`` (Gramian weightings) or ``random``.
        options: passed to the TorchJD weighting (e.g. ``c`` for CAGrad).
    """

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.from_gramian = name in _GRAMIAN_WEIGHTINGS
        self.weighting = _build(_GRAMIAN_WEIGHTINGS if self.from_gramian else _MATRIX_WEIGHTINGS, name, options)

    def __call__(self, jacobian: Tensor) -> Tensor:
        with torch.no_grad():
            stat = jacobian @ jacobian.T if self.from_gramian else jacobian
            return self.weighting(stat)


def torchjd_aggregator(name: str, **options: Any) -> Callable[[Tensor], Tensor]:
    """TorchJD's own aggregator (J -> update vector), for cross-checking our balancers (``pcgrad``,
    ``mgda``, ``imtl_g``, ``aligned_mtl``, ``gradvac``, ``cagrad``, ``random``, ``graddrop``,
    ``nash_mtl``; options are passed on)."""
    return _build(_AGGREGATORS, name, options)


def cvxpy_available() -> bool:
    """True when the optional ``solvers`` extra (cvxpy) is importable."""
    from importlib.util import find_spec

    return find_spec("cvxpy") is not None


class TorchJDNashMTL:
    """TorchJD's Nash-MTL weighting (cvxpy sequential convex solve), built for ``n_tasks`` tasks."""

    def __init__(self, n_tasks: int, optim_niter: int = 20) -> None:
        # max_norm=0: we clip the combined vector ourselves, identically for every solver.
        agg = _build(_AGGREGATORS, "nash_mtl", {"n_tasks": n_tasks, "max_norm": 0.0, "optim_niter": optim_niter})
        self.weighting = agg.weighting

    def __call__(self, jacobian: Tensor) -> Tensor:
        with torch.no_grad():
            return self.weighting(jacobian)


__all__ = ["TorchJDWeights", "TorchJDNashMTL", "torchjd_aggregator", "cvxpy_available", "SOLVERS_HINT"]
