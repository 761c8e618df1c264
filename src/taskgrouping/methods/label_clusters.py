"""``label_clusters``: the cheap, training-free grouping heuristic that DMTG must be reported beside.

It groups tasks by average-linkage clustering (into K clusters) of the |Pearson r| between their
training labels (scalar tasks, or per-pixel regression tasks correlated over samples and pixels), then
trains that grouping exactly like ``fixed``. It needs no training to choose the groups, but it can only
find groups whose *labels* are correlated: tasks that share features with uncorrelated labels look
unrelated to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskgrouping.data.base import TaskData, make_loader
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.dmtg.prior import cluster_prior, label_affinity
from taskgrouping.methods.baselines import fit_grouping
from taskgrouping.methods.options import MethodOptions


@dataclass(frozen=True)
class LabelClustersOptions(MethodOptions):
    """No options; the data must label tasks on common samples."""

    def check_data(self, data: TaskData) -> None:
        if data.info.get("form") == "long":
            raise ValueError(f"label_clusters needs tasks labelled on the same samples; the long-form table "
                             f"{data.info.get('path', data.name)!r} labels each row for one task, so no two tasks "
                             f"have a label correlation (use dmtg, hoa or tag there)")


def label_groups(ctx: MethodContext) -> tuple[list[list[str]], list[list[float]]]:
    """The K label clusters (task-name lists, numbered by first task, empty ones dropped) and the
    |label correlation| matrix on the training split."""
    names, K = ctx.data.task_names, int(ctx.K)
    if not 1 <= K <= len(names):
        raise ValueError(f"method 'label_clusters' needs 1 <= K <= {len(names)} (the number of tasks), got K={K}")
    # an unshuffled loader: the correlations do not depend on order, and no RNG is drawn from
    affinity = label_affinity(make_loader(ctx.data.train, ctx.train.batch_size, shuffle=False), ctx.data.tasks)
    cluster = cluster_prior(affinity, K, 1.0).argmax(dim=1).tolist()
    groups = [[n for n, c in zip(names, cluster) if c == k] for k in range(K)]
    return [g for g in groups if g], affinity.tolist()


@register_method("label_clusters", LabelClustersOptions)
def label_clusters(ctx: MethodContext) -> MethodResult:
    """Training-free baseline: K average-linkage clusters of the tasks' |label correlation|, trained as given."""
    groups, affinity = label_groups(ctx)
    grouping = Grouping.partition(groups, method="label_clusters")
    res = fit_grouping(ctx, grouping, "label_clusters")
    res.n_networks = len(grouping.groups)
    res.extra["label_affinity"] = affinity
    return res
