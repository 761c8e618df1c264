"""TAG (Fifty et al., NeurIPS 2021), "Efficiently Identifying Task Groupings for Multi-Task Learning".

The lookahead affinity of Eq. 3 (:mod:`.lookahead`), its accumulation over training and the trainer
callback that measures it (:mod:`.affinity`), affinity tables and the authors' files
(:mod:`.affinity_table`), the group selection (:mod:`.selection`) and the ``tag-select`` command
(:mod:`.cli`); the end-to-end method ``tag`` (:mod:`.method`, options in :mod:`.options`).
Importing the package registers the method.
"""

from taskgrouping.methods.tag.affinity import LOOKAHEADS, AffinityAccumulator, AffinityCollector
from taskgrouping.methods.tag.affinity_table import AffinityLike, load_affinity, to_file_form
from taskgrouping.methods.tag.cli import tag_select_cli
from taskgrouping.methods.tag.lookahead import lookahead_affinity
from taskgrouping.methods.tag.method import tag
from taskgrouping.methods.tag.options import TAGOptions
from taskgrouping.methods.tag.selection import MAX_SELECTION_TASKS, select_groups

__all__ = ["AffinityLike", "load_affinity", "to_file_form", "lookahead_affinity", "AffinityAccumulator",
           "AffinityCollector", "LOOKAHEADS", "select_groups", "MAX_SELECTION_TASKS", "tag_select_cli",
           "TAGOptions", "tag"]
