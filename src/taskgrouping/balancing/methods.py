"""Populates the balancer registry: importing this module registers every method.

``get_balancer`` (in :mod:`taskgrouping.balancing.base`) imports it before a lookup.

* loss weighting (:mod:`~taskgrouping.balancing.weighting`): ``uw``, ``dwa``, ``rlw``, ``famo``,
  ``gradnorm``, ``auto_lambda``;
* gradient surgery / aggregation (:mod:`~taskgrouping.balancing.gradient`, built on
  :mod:`~taskgrouping.balancing.jacobian`; task weights from
  :mod:`~taskgrouping.balancing.gramian_weightings`, :mod:`~taskgrouping.balancing.solvers` and
  :mod:`~taskgrouping.balancing.torchjd_adapter`): ``ew``, ``pcgrad``, ``gradvac``, ``graddrop``,
  ``rgw``, ``mgda``, ``mgda_ub``, ``cagrad``, ``nash_mtl``, ``aligned_mtl``, ``aligned_mtl_ub``,
  ``imtl``, ``cosreg``.

Every gradient method takes ``feature_level=True`` for the fast feature-level surrogate.
"""

from __future__ import annotations

from taskgrouping.balancing import gradient, weighting  # noqa: F401  (registration side effect)
from taskgrouping.balancing.base import BALANCERS, get_balancer, register_balancer

#: Methods that aggregate per-task gradients (they accept ``feature_level``).
GRADIENT_METHODS = ("ew", "pcgrad", "gradvac", "graddrop", "rgw", "mgda", "mgda_ub", "cagrad", "nash_mtl",
                    "aligned_mtl", "aligned_mtl_ub", "imtl", "cosreg", "gradnorm", "auto_lambda")
#: Methods that only reweight the task losses (one backward).
LOSS_WEIGHTING_METHODS = ("uw", "dwa", "rlw", "famo")

__all__ = ["BALANCERS", "get_balancer", "register_balancer", "GRADIENT_METHODS", "LOSS_WEIGHTING_METHODS"]
