"""The catalogue of balancers: importing this module registers every method.

``get_balancer`` (in :mod:`taskgrouping.balancing.base`) imports it before a lookup, so the
families below stay unimported (TorchJD, SciPy) until a balancer is asked for.

* loss weighting (:mod:`~taskgrouping.balancing.loss_weighting`): ``uw``, ``dwa``, ``rlw``, ``famo``;
* learned task weights (:mod:`~taskgrouping.balancing.learned_weighting`): ``gradnorm``, ``auto_lambda``;
* Jacobian weightings (:mod:`~taskgrouping.balancing.gradient_weighting`): ``ew``, ``rgw``, ``imtl``,
  ``aligned_mtl``, ``aligned_mtl_ub``;
* gradient surgery (:mod:`~taskgrouping.balancing.gradient_surgery`): ``pcgrad``, ``gradvac``, ``graddrop``;
* multi-objective solvers (:mod:`~taskgrouping.balancing.multi_objective`): ``mgda``, ``mgda_ub``,
  ``cagrad``, ``nash_mtl``;
* gradient regularisation (:mod:`~taskgrouping.balancing.cosreg`): ``cosreg``.

Every gradient method takes ``feature_level=True`` for the fast feature-level surrogate.
"""

from __future__ import annotations

from taskgrouping.balancing import (  # noqa: F401  (registration side effect)
    cosreg,
    gradient_surgery,
    gradient_weighting,
    learned_weighting,
    loss_weighting,
    multi_objective,
)
from taskgrouping.balancing.base import BALANCERS, get_balancer, register_balancer

#: Methods that aggregate per-task gradients (they accept ``feature_level``).
GRADIENT_METHODS = ("ew", "pcgrad", "gradvac", "graddrop", "rgw", "mgda", "mgda_ub", "cagrad", "nash_mtl",
                    "aligned_mtl", "aligned_mtl_ub", "imtl", "cosreg", "gradnorm", "auto_lambda")
#: Methods that only reweight the task losses (one backward).
LOSS_WEIGHTING_METHODS = ("uw", "dwa", "rlw", "famo")

__all__ = ["BALANCERS", "get_balancer", "register_balancer", "GRADIENT_METHODS", "LOSS_WEIGHTING_METHODS"]
