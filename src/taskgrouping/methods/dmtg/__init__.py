"""DMTG: one-shot differentiable multi-task grouping (Gao et al., ICML 2024).

K group branches, each wired to all N task heads; an N x K assignment S, relaxed with Gumbel-softmax,
weighs head (k, i)'s loss (Eq. 4-5), and S trains with the weights. Modules: ``options`` (the options
and the ``paper`` / ``paper_code`` / ``attribution`` (default) / ``robust`` recipes), ``model`` (the
network, its gradient scaling and the pruned one-shot result), ``losses`` (stacked head losses),
``objective`` (the per-step loss, the warm-up, head pruning, the opt-in mates pull), ``attribution``
(the input-attribution affinity and its pull on S), ``prior`` (S's initialisations) and ``method`` (the
registered ``dmtg`` method; importing this package registers it).
"""

from taskgrouping.methods.dmtg.losses import StackedTargets
from taskgrouping.methods.dmtg.method import dmtg, start_from_initial_grouping, warm_start_model
from taskgrouping.methods.dmtg.model import DMTGModel, scale_grad
from taskgrouping.methods.dmtg.objective import DMTGObjective
from taskgrouping.methods.dmtg.options import RECIPES, WARMUP_MODES, DMTGOptions
from taskgrouping.methods.dmtg.prior import affinity_prior, cluster_prior, initial_s, label_affinity

__all__ = ["DMTGModel", "DMTGObjective", "DMTGOptions", "RECIPES", "StackedTargets", "WARMUP_MODES",
           "affinity_prior", "cluster_prior", "dmtg", "initial_s", "label_affinity", "scale_grad",
           "start_from_initial_grouping", "warm_start_model"]
