"""Diagnostics of multi-task training (Mao et al. 2024): how task gradients and feature saliencies
relate - GDS, GMS and FD (:mod:`.measures`), ranking similarity (:mod:`.ranking`), logged during
training by :class:`DiagnosticsCallback` (:mod:`.callback`) and plotted by
:func:`plot_trajectories` (:mod:`.plots`). The per-task gradients come from
:mod:`taskgrouping.balancing.task_gradients`, shared with the balancers.
"""

from taskgrouping.balancing.task_gradients import task_gradients
from taskgrouping.diagnostics.callback import DiagnosticsCallback
from taskgrouping.diagnostics.measures import (
    MEASURES,
    diagnose,
    feature_disentanglement,
    feature_disentanglement_from_saliency,
    gradient_direction_matrix,
    gradient_direction_similarity,
    gradient_magnitude_matrix,
    gradient_magnitude_similarity,
    task_saliency,
)
from taskgrouping.diagnostics.plots import plot_trajectories
from taskgrouping.diagnostics.ranking import ranking_similarity, ranking_similarity_gap

__all__ = [
    "MEASURES", "task_gradients", "task_saliency", "gradient_direction_matrix", "gradient_magnitude_matrix",
    "gradient_direction_similarity", "gradient_magnitude_similarity", "feature_disentanglement",
    "feature_disentanglement_from_saliency", "ranking_similarity", "ranking_similarity_gap", "diagnose",
    "DiagnosticsCallback", "plot_trajectories",
]
