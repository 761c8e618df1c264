"""NYUv2 loader on tiny copies of MTAN's preprocessed .npy layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_realdata import write_nyuv2
from taskgrouping.data.base import make_loader
from taskgrouping.data.nyuv2 import nyuv2
from taskgrouping.data.registry import load_dataset

torch.set_num_threads(1)
SIZE = [6, 8]


def test_targets_follow_mtan_conventions(tmp_path):
    raw = write_nyuv2(tmp_path, n_train=10, n_val=4)
    data = nyuv2(root=str(tmp_path), image_size=SIZE)
    assert data.input_shape == (3, 6, 8)
    assert [(t.name, t.kind, t.n_outputs, t.loss_type) for t in data.tasks] == [
        ("semantic", "segmentation", 13, "ce"), ("depth", "dense_regression", 1, "l1"),
        ("normal", "normal", 3, "cosine")]
    assert data.test.indices == [0, 1, 2, 3]
    x, y = data.test[2]
    src = raw[("val", 2)]
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(src["image"]).permute(2, 0, 1))
    assert y["semantic"].dtype == torch.int64
    assert y["semantic"].tolist() == src["label"].astype(np.int64).tolist()
    assert (y["semantic"] == -1).any()  # ignored pixels kept as -1
    depth = y["depth"]
    assert depth.shape == (1, 6, 8) and depth.isnan().sum() == 1 and depth[0, 0, 1].isnan()
    valid = ~depth.isnan()
    assert torch.equal(depth[valid], torch.from_numpy(src["depth"]).permute(2, 0, 1)[valid])
    normal = y["normal"]
    assert normal.shape == (3, 6, 8) and normal[:, 0, 0].isnan().all() and normal.isnan().sum() == 3
    assert torch.allclose(normal[:, 1:], torch.from_numpy(src["normal"]).permute(2, 0, 1)[:, 1:])


def test_validation_is_a_seeded_hold_out_of_train(tmp_path):
    write_nyuv2(tmp_path, n_train=10, n_val=4)
    a = nyuv2(root=str(tmp_path), image_size=SIZE, val_fraction=0.2, seed=0)
    b = nyuv2(root=str(tmp_path), image_size=SIZE, val_fraction=0.2, seed=0)
    c = nyuv2(root=str(tmp_path), image_size=SIZE, val_fraction=0.2, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (8, 2, 4)
    assert sorted(a.train.indices + a.val.indices) == list(range(10))
    assert a.val.indices == b.val.indices and a.val.indices != c.val.indices
    assert a.val.folder.name == "train" and a.test.folder.name == "val"
    mtan = nyuv2(root=str(tmp_path), image_size=SIZE, val_fraction=0)
    assert len(mtan.train) == 10 and mtan.val is mtan.test


def test_losses_match_mtan_formulas(tmp_path):
    write_nyuv2(tmp_path, n_train=3, n_val=2)
    data = load_dataset("nyuv2", root=str(tmp_path), image_size=SIZE, val_fraction=0)
    x, y = next(iter(make_loader(data.test, batch_size=2, shuffle=False)))
    assert x.shape == (2, 3, 6, 8) and y["semantic"].shape == (2, 6, 8)
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 6, 8, generator=g)
    # MTAN: normalise the prediction, mask = target not all zero, loss = 1 - sum(pred . gt) / #valid pixels
    gt = torch.nan_to_num(y["normal"])
    mask = (gt != 0).any(dim=1, keepdim=True)
    p = pred / pred.norm(dim=1, keepdim=True)
    mtan_normal = 1 - (p * gt * mask).sum() / mask.sum()
    assert data.task("normal").loss(pred, y["normal"]).item() == pytest.approx(mtan_normal.item(), rel=1e-5)
    d = torch.nan_to_num(y["depth"])
    dmask = d != 0
    mtan_depth = ((pred[:, :1] - d).abs() * dmask).sum() / dmask.sum()
    assert data.task("depth").loss(pred[:, :1], y["depth"]).item() == pytest.approx(mtan_depth.item(), rel=1e-5)
    logits = torch.randn(2, 13, 6, 8, generator=g)
    ce = F.cross_entropy(logits, y["semantic"], ignore_index=-1)
    assert data.task("semantic").loss(logits, y["semantic"]).item() == pytest.approx(ce.item(), rel=1e-5)


def test_wrong_shape_names_file_found_and_expected(tmp_path):
    write_nyuv2(tmp_path, n_train=3, n_val=2)
    np.save(tmp_path / "train" / "depth" / "1.npy", np.ones((6, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"train/depth/1\.npy' has shape \(6, 8\); expected \(6, 8, 1\)"):
        nyuv2(root=str(tmp_path), image_size=SIZE)
    with pytest.raises(ValueError, match=r"image/0\.npy' has shape \(6, 8, 3\); expected \(288, 384, 3\)"):
        nyuv2(root=str(tmp_path))  # default MTAN size
    assert len(nyuv2(root=str(tmp_path), image_size=SIZE, tasks=["semantic", "normal"], val_fraction=0).train) == 3


def test_bad_files_are_named(tmp_path):
    write_nyuv2(tmp_path, n_train=3, n_val=2)
    (tmp_path / "val" / "normal" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/normal/1\.npy"):
        nyuv2(root=str(tmp_path), image_size=SIZE)
    np.save(tmp_path / "val" / "normal" / "1.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"val/normal/1\.npy.*objects"):
        nyuv2(root=str(tmp_path), image_size=SIZE)
    np.save(tmp_path / "val" / "normal" / "1.npy", np.zeros((6, 8, 3), dtype=np.float32))
    np.save(tmp_path / "train" / "image" / "2.npy", np.zeros((6, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train/image/2\.npy' has dtype uint8; expected floats"):
        nyuv2(root=str(tmp_path), image_size=SIZE)
    np.save(tmp_path / "train" / "image" / "2.npy", np.zeros((6, 8, 3), dtype=np.float32))
    data = nyuv2(root=str(tmp_path), image_size=SIZE, val_fraction=0)
    label = np.zeros((6, 8), dtype=np.float32)
    label[2, 3] = 13
    np.save(tmp_path / "val" / "label" / "0.npy", label)
    with pytest.raises(ValueError, match=r"val/label/0\.npy.*label 13.*-1\.\.12"):
        data.test[0]
    with pytest.raises(ValueError, match=r"unknown NYUv2 task 'segmentation'"):
        nyuv2(root=str(tmp_path), image_size=SIZE, tasks=["segmentation"])
    with pytest.raises(FileNotFoundError, match=r"nowhere/train/image"):
        nyuv2(root=str(tmp_path / "nowhere"), image_size=SIZE)
