"""MultiMNIST dense: shapes, known grouping, targets against the source digits, determinism, disjoint
splits, partial labels, weak pixel-wise correlations, option errors, small_cnn's ``maps`` option and
the preset's model."""

import itertools
import math

import pytest
import torch

from taskgrouping.config import build_config
from taskgrouping.data.builtin import load_mnist_5k
from taskgrouping.data.multimnist_dense import DEFAULT_MAPS, digit_maps, multimnist_dense
from taskgrouping.data.registry import load_dataset
from taskgrouping.models.backbones import build_backbone, output_shape
from taskgrouping.models.branched import build_branched_model

torch.set_num_threads(1)
SMALL = dict(n_train=60, n_val=20, n_test=30)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def small():
    return multimnist_dense(**SMALL, image_size=16, label_fraction=1.0, seed=0)


def unstandardise(d, name, split="train"):
    st = d.info["target_stats"][name]
    return getattr(d, split).targets[name] * st["std"] + st["mean"]


def test_shapes_dtypes_tasks_and_known_grouping(small):
    d = small
    names = [f"{s}_{m}" for s in ("left", "right") for m in DEFAULT_MAPS]
    assert d.task_names == names and d.input_shape == (1, 16, 16)
    assert d.groups == [names[:3], names[3:]]
    assert all(t.kind == "dense_regression" and t.loss_type == "mse" and t.out_channels == 1 for t in d.tasks)
    for split, n in (("train", 60), ("val", 20), ("test", 30)):
        ds = getattr(d, split)
        assert ds.x.shape == (n, 1, 16, 16) and ds.x.dtype == torch.float32
        assert 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1
        assert ds.source_indices.shape == (n, 2)
        for name in names:
            y = ds.targets[name]
            assert y.shape == (n, 1, 16, 16) and y.dtype == torch.float32 and not torch.isnan(y).any()
    for name in names:  # standardised on the training split
        y = d.train.targets[name].double()
        assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5
    xy = multimnist_dense(**SMALL, image_size=16, maps=["dy", "mask", "dx"], label_fraction=1.0)
    assert xy.groups == [["left_mask", "left_dx", "left_dy"], ["right_mask", "right_dx", "right_dy"]]


def test_targets_match_source_digits_without_resizing(mnist):
    images, _ = mnist
    d = multimnist_dense(**SMALL, image_size=36, offset=8, maps=list(DEFAULT_MAPS) + ["dx", "dy"],
                         label_fraction=1.0, seed=2)
    src = d.test.source_indices
    left = torch.zeros(30, 1, 36, 36)
    left[:, 0, :28, :28] = torch.from_numpy(images[src[:, 0].numpy()]).float() / 255
    right = torch.zeros(30, 1, 36, 36)
    right[:, 0, 8:, 8:] = torch.from_numpy(images[src[:, 1].numpy()]).float() / 255
    assert torch.equal(d.test.x, torch.maximum(left, right))
    for side, m in (("left", left), ("right", right)):
        ref = digit_maps(m)
        for name in ("mask", "dx", "dy", "ddiag", "danti"):
            assert torch.allclose(unstandardise(d, f"{side}_{name}", "test"), ref[name], atol=1e-5)
    # the maps: a central difference along x, and the diagonal ones from x and y
    m = torch.zeros(1, 1, 3, 4)
    m[0, 0, 1, 1] = 1.0
    maps = digit_maps(m)
    assert maps["dx"][0, 0, 1].tolist() == [0.5, 0.0, -0.5, 0.0]
    assert maps["dy"][0, 0, :, 1].tolist() == [0.5, 0.0, -0.5]
    assert torch.allclose(maps["ddiag"], (maps["dx"] + maps["dy"]) / math.sqrt(2))
    assert torch.allclose(maps["danti"], (maps["dx"] - maps["dy"]) / math.sqrt(2))


def test_determinism_by_seed_and_disjoint_source_digits():
    a = multimnist_dense(**SMALL, seed=5)
    b = multimnist_dense(**SMALL, seed=5)
    c = multimnist_dense(**SMALL, seed=6)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        for name in a.task_names:
            ya, yb = getattr(a, split).targets[name], getattr(b, split).targets[name]
            assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    assert not torch.equal(a.train.x, c.train.x)
    src = {s: set(getattr(a, s).source_indices.flatten().tolist()) for s in ("train", "val", "test")}
    for s, t in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not src[s] & src[t]


def test_partial_labels_per_task_on_train_only():
    d = multimnist_dense(n_train=100, n_val=20, n_test=20, label_fraction=0.25, seed=1)
    masks = []
    for name in d.task_names:
        y = d.train.targets[name].flatten(1)
        missing = torch.isnan(y)
        assert torch.equal(missing.all(1), missing.any(1))  # a whole image is labelled or not
        assert int((~missing.all(1)).sum()) == 25
        labelled = y[~missing.all(1)].double()
        assert abs(float(labelled.mean())) < 1e-5 and abs(float(labelled.std()) - 1) < 1e-5
        masks.append(missing.all(1))
        assert not torch.isnan(d.val.targets[name]).any() and not torch.isnan(d.test.targets[name]).any()
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)  # drawn independently per task
    # the same images as with every label kept
    full = multimnist_dense(n_train=100, n_val=20, n_test=20, label_fraction=1.0, seed=1)
    assert torch.equal(full.train.x, d.train.x) and torch.equal(full.test.x, d.test.x)


def test_targets_weakly_correlated_pixelwise():
    # measured on 3,000 images (benchmarks/bench_multimnist_dense.py): within a digit max |r| ~0.05
    # (the mask and its derivatives are exactly uncorrelated), across digits ~0.12
    d = multimnist_dense(n_train=1000, n_val=1, n_test=1, label_fraction=1.0, seed=0)
    y = torch.stack([d.train.targets[n].flatten().double() for n in d.task_names])
    r = torch.corrcoef(y)
    for i, j in itertools.combinations(range(6), 2):
        same_digit = (i < 3) == (j < 3)
        assert abs(float(r[i, j])) < (0.1 if same_digit else 0.2), (d.task_names[i], d.task_names[j], float(r[i, j]))
    assert abs(float(r[0, 1])) < 1e-3 and abs(float(r[0, 2])) < 1e-3  # mask vs its own derivatives


@pytest.mark.parametrize("kw, msg", [
    (dict(maps="mask"), "data.maps must be"), (dict(maps=[]), "data.maps must be"),
    (dict(maps=["depth"]), "data.maps must be"), (dict(maps=["mask", "mask"]), "data.maps must be"),
    (dict(label_fraction=0), "data.label_fraction"), (dict(label_fraction=1.5), "data.label_fraction"),
    (dict(loss_type="huber"), "data.loss_type"), (dict(n_train=0), "data.n_train"),
    (dict(image_size=0), "data.image_size"), (dict(offset=-1), "data.offset"),
    (dict(source_split=(0.5, 0.5)), "data.source_split"),
    (dict(image_size=1, n_train=20, n_val=5, n_test=5), "is constant on its labelled training pixels")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg) as info:
        multimnist_dense(**kw)
    assert "\n" not in str(info.value)


def test_registry_and_unknown_option():
    d = load_dataset("multimnist_dense", n_train=10, n_val=5, n_test=5)
    assert d.name == "multimnist_dense"
    with pytest.raises(ValueError, match="data.bogus"):
        load_dataset("multimnist_dense", bogus=1)


def test_small_cnn_maps_option():
    torch.manual_seed(0)
    plain = build_backbone("small_cnn", (1, 16, 16), channels=[8, 16], feature_dim=32)
    torch.manual_seed(0)
    same = build_backbone("small_cnn", (1, 16, 16), channels=[8, 16], feature_dim=32, maps=0)
    assert output_shape(plain, (1, 16, 16)) == (32,) and len(plain) == len(same) == 3
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), same.state_dict().values()))
    torch.manual_seed(0)
    dense = build_backbone("small_cnn", (1, 16, 16), channels=[8, 16], feature_dim=32, maps=2)
    assert output_shape(dense, (1, 16, 16)) == (2, 16, 16) and len(dense) == 3
    # the new layer comes last: everything before it is initialised as without it
    assert all(torch.equal(p, dense.state_dict()[k]) for k, p in plain.state_dict().items())
    with pytest.raises(ValueError, match="maps must be >= 0"):
        build_backbone("small_cnn", (1, 16, 16), maps=-1)


def test_preset_config_and_model_forward():
    cfg = build_config(preset="multimnist_dense")
    assert cfg["K"] == 2 and cfg["methods"] == ["naive_mtl", "single_task", "oracle", "label_clusters", "dmtg"]
    opts = {k: v for k, v in cfg["data"].items() if k != "name"}
    d = multimnist_dense(**dict(opts, n_train=40, n_val=10, n_test=10))
    torch.manual_seed(0)
    model = build_branched_model(d.tasks, d.groups, d.input_shape, cfg["model"]["backbone"], cfg["model"]["options"])
    x, y = d.test[list(range(4))]
    out = model(x)
    assert set(out) == set(d.task_names)
    for t in d.tasks:
        assert out[t.name].shape == (4, 1, 16, 16)
        assert torch.isfinite(t.loss(out[t.name], y[t.name]))
