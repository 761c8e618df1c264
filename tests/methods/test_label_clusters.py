"""``label_clusters``, the training-free baseline: K average-linkage clusters of |label correlation|.

It must find groups whose labels correlate (the planted ones; a hand-built dataset whose clusters
are known), train them exactly as ``fixed`` would, and refuse a K it cannot honour in one line.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.builtin import planted
from taskgrouping.methods.base import MethodContext, available_methods
from taskgrouping.methods.label_clusters import label_groups
from taskgrouping.tasks import Task
from taskgrouping.engine.trainer import TrainConfig

torch.set_num_threads(1)

TRAIN = TrainConfig(epochs=2, batch_size=64, progress=False)
MODEL = {"backbone": "mlp", "options": {"widths": [16, 8]}}


def context(data: TaskData, K: int, name: str, options: dict | None = None) -> MethodContext:
    return MethodContext(data=data, seed=0, K=K, train=TRAIN, model=MODEL, balancer={"name": "ew"},
                         options=options or {}, name=name)


def as_sets(groups) -> set[frozenset[str]]:
    return {frozenset(g) for g in groups}


def test_planted_groups_are_found_and_trained_like_fixed():
    data = planted(n_tasks=6, group_sizes=[3, 3], input_dim=16, feature_dim=4, n_train=300, n_val=100, n_test=100)
    methods = available_methods()
    res = methods["label_clusters"](context(data, 2, "label_clusters"))
    assert as_sets(res.grouping.groups) == as_sets(data.groups)
    assert res.n_networks == 2
    # the recorded affinity is |Pearson r| of the training labels, computed here independently
    y = np.stack([data.train.targets[t].reshape(-1).double().numpy() for t in data.task_names])
    np.testing.assert_allclose(np.array(res.extra["label_affinity"]), np.abs(np.corrcoef(y)), atol=1e-10)
    fixed = methods["fixed"](context(data, 2, "fixed", {"groups": [list(g) for g in res.grouping.groups]}))
    assert res.per_task == fixed.per_task
    assert res.val_per_task == fixed.val_per_task


def hand_built(n: int = 400) -> TaskData:
    """a ~ b and c ~ d (equal up to small noise), a and c independent; stored in the order a, c, b, d
    so that the clusters are not contiguous."""
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(n, generator=g), torch.randn(n, generator=g)
    labels = {"a": a, "c": c, "b": a + 0.1 * torch.randn(n, generator=g), "d": -c + 0.1 * torch.randn(n, generator=g)}
    tasks = [Task(name, "regression") for name in labels]
    split = TensorTaskDataset(torch.randn(n, 3, generator=g), {k: v.unsqueeze(1) for k, v in labels.items()})
    return TaskData(name="hand", tasks=tasks, train=split, val=split, test=split, input_shape=(3,))


def test_hand_built_correlations_give_the_known_clusters():
    data = hand_built()
    groups, affinity = label_groups(context(data, 2, "label_clusters"))
    assert groups == [["a", "b"], ["c", "d"]]  # numbered by first task; |r| so anti-correlated d joins c
    aff = np.array(affinity)
    assert aff[0, 2] > 0.99 and aff[1, 3] > 0.99 and aff[0, 1] < 0.2  # rows/cols in order a, c, b, d
    assert label_groups(context(data, 1, "label_clusters"))[0] == [["a", "c", "b", "d"]]
    assert label_groups(context(data, 4, "label_clusters"))[0] == [["a"], ["c"], ["b"], ["d"]]


@pytest.mark.parametrize("K", [0, 5])
def test_k_out_of_range_is_a_clear_error(K):
    with pytest.raises(ValueError, match=r"label_clusters' needs 1 <= K <= 4 .*got K=" + str(K)) as err:
        available_methods()["label_clusters"](context(hand_built(), K, "label_clusters"))
    assert "\n" not in str(err.value)


def test_non_scalar_tasks_are_a_clear_error():
    data = hand_built()
    n = len(data.train)
    split = TensorTaskDataset(data.train.x, dict(data.train.targets, m=torch.zeros(n, dtype=torch.long)))
    mixed = TaskData(name="mixed", tasks=data.tasks + [Task("m", "multiclass", num_classes=3)], train=split,
                     val=split, test=split, input_shape=(3,))
    with pytest.raises(ValueError, match=r"only dense_regression ones; \['m'\] do not fit"):
        label_groups(context(mixed, 2, "label_clusters"))


def test_cli_lists_label_clusters():
    proc = subprocess.run([sys.executable, "-m", "taskgrouping.cli", "methods"], capture_output=True, text=True,
                          timeout=120, check=True)
    assert any(line.startswith("label_clusters: Training-free baseline") for line in proc.stdout.splitlines())


def test_dense_tasks_correlate_over_samples_and_pixels():
    """Per-pixel regression targets: |r| over every (sample, pixel) labelled for both; NaN pixels are skipped.
    Hand-built: b = 2a + 1 everywhere (r = 1), c = -a on the labelled half (r = 1 in absolute value), d independent."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 1, 4, 4, generator=g)
    d = torch.randn(40, 1, 4, 4, generator=g)
    c = -a.clone()
    c[20:] = float("nan")
    targets = {"a": a, "b": 2 * a + 1, "c": c, "d": d}
    split = TensorTaskDataset(torch.zeros(40, 1, 4, 4), targets)
    tasks = [Task(n, "dense_regression") for n in targets]
    data = TaskData(name="dense", tasks=tasks, train=split, val=split, test=split, input_shape=(1, 4, 4))
    groups, aff = label_groups(context(data, 2, "label_clusters"))
    aff = np.array(aff)
    assert aff[0, 1] == pytest.approx(1.0) and aff[0, 2] == pytest.approx(1.0)
    expected = abs(np.corrcoef(a.flatten().numpy(), d.flatten().numpy())[0, 1])
    assert aff[0, 3] == pytest.approx(expected, rel=1e-9) and aff[0, 3] < 0.2
    assert as_sets(groups) == {frozenset("abc"), frozenset("d")}
