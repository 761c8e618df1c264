"""MTG-Net (Song et al., NeurIPS 2022): multi-task grouping by meta-learning on task combinations.

A meta-learner maps a task combination to the gain of each of its tasks (:mod:`.meta_learner`,
:mod:`.meta_training`); active sampling picks which combinations to train to fit it
(:mod:`.sampling`); the grouping is searched on the gains (:mod:`.search`, :mod:`.pipeline`). The
authors' measured gains answer in place of training in oracle mode (:mod:`.gain_table`). Importing
the package registers the end-to-end method ``mtg_net`` (:mod:`.method`, options in :mod:`.options`).
"""

from taskgrouping.methods.mtg_net.config import MTGNetConfig
from taskgrouping.methods.mtg_net.gain_table import (MTGNET_FILES, MTGNET_TASKS, GainTable, grouping_gain,
                                                     load_mtgnet_gains)
from taskgrouping.methods.mtg_net.meta_learner import MetaLearner
from taskgrouping.methods.mtg_net.meta_training import fit_meta_learner, predict_gains
from taskgrouping.methods.mtg_net.method import GAIN_DEFINITION, mtg_net  # importing it registers mtg_net
from taskgrouping.methods.mtg_net.options import MTGNetOptions
from taskgrouping.methods.mtg_net.pipeline import default_candidates, mtgnet_search, search_from_sampling
from taskgrouping.methods.mtg_net.sampling import (SEARCH_GUIDED_MAX_TASKS, ActiveSamplingResult, Evaluate,
                                                   active_sampling)
from taskgrouping.methods.mtg_net.search import beam_partition_search, search_groups

__all__ = ["ActiveSamplingResult", "Evaluate", "GAIN_DEFINITION", "GainTable", "MTGNET_FILES", "MTGNET_TASKS",
           "MTGNetConfig", "MTGNetOptions", "MetaLearner", "SEARCH_GUIDED_MAX_TASKS", "active_sampling",
           "beam_partition_search", "default_candidates", "fit_meta_learner", "grouping_gain",
           "load_mtgnet_gains", "mtg_net", "mtgnet_search", "predict_gains", "search_from_sampling",
           "search_groups"]
