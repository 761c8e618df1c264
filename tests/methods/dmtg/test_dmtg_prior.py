"""DMTG's label prior: the label correlations cluster into the planted groups."""

from taskgrouping.data.builtin import planted
from taskgrouping.methods.dmtg.prior import cluster_prior, label_affinity


def test_label_affinity_and_cluster_prior_recover_groups():
    data = planted(n_tasks=6, group_sizes=[3, 3], within_group_similarity=0.8, n_train=600, n_val=10, n_test=10)
    from taskgrouping.data.base import make_loader

    aff = label_affinity(make_loader(data.train, 100, False), data.tasks)
    s = cluster_prior(aff, 2, 3.0)
    labels = s.argmax(1).tolist()
    assert labels[:3] == [labels[0]] * 3 and labels[3:] == [labels[3]] * 3 and labels[0] != labels[3]
