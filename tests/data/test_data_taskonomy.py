"""Taskonomy loader on tiny PNG trees in the official layout (16-bit depth/keypoints/edges)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import GROUPING_DATA
from fixtures_realdata import (random_taskonomy_arrays, taskonomy_path, write_taskonomy,
                               write_taskonomy_point)
from taskgrouping.data.base import make_loader
from taskgrouping.data.registry import load_dataset
from taskgrouping.data.taskonomy import DEFAULT_TASKS, taskonomy

torch.set_num_threads(1)
SPLITS = GROUPING_DATA / "dmtg" / "splits"
ALL_TASKS = [*DEFAULT_TASKS, "edge_occlusion"]


def _hand_arrays() -> dict[str, np.ndarray]:
    depth = np.array([[0, 1500, 2500, 8191], [8192, 65535, 3500, 1000]], dtype=np.uint16)
    normal = np.zeros((2, 4, 3), dtype=np.uint8)
    normal[0, :, 0] = [0, 255, 128, 51]
    return {
        "rgb": np.stack([np.array([[0, 255, 51, 102], [10, 20, 30, 40]], dtype=np.uint8)] * 3, axis=2),
        "segment_semantic": np.array([[0, 1, 17, 5], [0, 0, 2, 3]], dtype=np.uint8),
        "depth_zbuffer": depth,
        "normal": normal,
        "keypoints2d": np.array([[50, 150, 0, 65535], [0, 0, 0, 0]], dtype=np.uint16),
        "edge_texture": np.array([[718, 1788, 0, 2000], [0, 0, 0, 0]], dtype=np.uint16),
        "edge_occlusion": np.array([[0, 1000, 56, 0], [7, 7, 7, 7]], dtype=np.uint16),
    }


def _one_view_root(tmp_path: Path, arrays: dict[str, np.ndarray], layout: str = "official") -> Path:
    root = tmp_path / layout
    write_taskonomy_point(root, "allensville", 3, 7, arrays, layout)
    return root


def _load(root: Path, **kw):
    opts = dict(train_buildings=["allensville"], val_buildings=["allensville"], test_buildings=["allensville"])
    opts.update(kw)
    return taskonomy(root=str(root), **opts)


def test_normalisations_on_hand_computed_pixels(tmp_path):
    arrays = {k: np.concatenate([v, v], axis=0) for k, v in _hand_arrays().items()}  # 4x4
    root = _one_view_root(tmp_path, arrays)
    data = _load(root, tasks=ALL_TASKS, image_size=4)
    x, y = data.train[0]
    nan = math.nan
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert x[0, 0].tolist() == pytest.approx([0.0, 1.0, 0.2, 0.4], abs=1e-6)
    assert y["segment_semantic"].dtype == torch.int64 and y["segment_semantic"].shape == (4, 4)
    assert y["segment_semantic"][:2].tolist() == [[-1, 1, 17, 5], [-1, -1, 2, 3]]
    assert y["depth_zbuffer"].shape == (1, 4, 4)
    assert y["depth_zbuffer"][0, :2].flatten().tolist() == pytest.approx(
        [-1.5, 0.0, 1.0, 6.691, nan, nan, 2.0, -0.5], nan_ok=True, abs=1e-6)
    assert y["normal"].shape == (3, 4, 4)
    assert y["normal"][0, 0].tolist() == pytest.approx([-1.0, 1.0, 2 * (128 / 255 - 0.5), 2 * (51 / 255 - 0.5)],
                                                    abs=1e-6)
    assert y["normal"][:, 1, :2].isnan().all() and not y["normal"][:, 1, 2:].isnan().any()  # invalid depth
    assert y["keypoints2d"][0, 0].tolist() == pytest.approx([0.0, 1.0, -0.5, 654.85], abs=1e-4)
    assert y["edge_texture"][0, 0].tolist() == pytest.approx([0.0, 1.0, -718 / 1070, 1282 / 1070], abs=1e-6)
    eo = y["edge_occlusion"][0]
    assert eo[0].tolist() == pytest.approx([-0.2342894, 3.9475976, -0.0001037, -0.2342894], abs=1e-6)
    assert eo[1, :2].isnan().all() and eo[1, 2].item() == pytest.approx((7 - 56.0248) / 239.1265, abs=1e-6)
    assert not y["keypoints2d"].isnan().any()  # only normal / edge_occlusion share the depth mask

    plain = _load(root, tasks=["normal"], image_size=4, mask_from_depth=False)
    assert not plain.train[0][1]["normal"].isnan().any()
    assert [t.kind for t in data.tasks] == ["segmentation", "dense_regression", "normal", "dense_regression",
                                            "dense_regression", "dense_regression"]
    assert data.tasks[0].num_classes == 18 and all(t.loss_type in ("ce", "l1") for t in data.tasks)


def test_both_layouts_give_identical_items(tmp_path):
    arrays = random_taskonomy_arrays(np.random.default_rng(1), 6)
    official = _load(_one_view_root(tmp_path, arrays, "official"), image_size=6)
    swapped = _load(_one_view_root(tmp_path, arrays, "building_first"), image_size=6)
    assert (tmp_path / "building_first" / "allensville" / "segment_semantic").is_dir()
    xa, ya = official.train[0]
    xb, yb = swapped.train[0]
    assert torch.equal(xa, xb)
    for t in DEFAULT_TASKS:
        assert torch.allclose(ya[t].float(), yb[t].float(), equal_nan=True)


def test_dmtg_tiny_split_files(tmp_path):
    names = {s: (SPLITS / f"tiny_{s}_models.txt").read_text().split() for s in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [25, 5, 5]
    rng = np.random.default_rng(0)
    for b in sum(names.values(), []):
        arrays = random_taskonomy_arrays(rng, 2)
        write_taskonomy_point(tmp_path, b, 0, 0, {k: arrays[k] for k in ("rgb", *DEFAULT_TASKS)})
    data = load_dataset("taskonomy", root=str(tmp_path), image_size=2,
                        **{f"{s}_buildings": str(SPLITS / f"tiny_{s}_models.txt") for s in ("train", "val", "test")})
    assert (len(data.train), len(data.val), len(data.test)) == (25, 5, 5)
    assert data.info["buildings"]["train"] == names["train"]
    assert {v.building for v in data.test.views} == set(names["test"])


def test_views_sorted_by_name_and_sliced_per_building(tmp_path):
    write_taskonomy(tmp_path, ["a", "b"], points=12, size=2)
    data = taskonomy(root=str(tmp_path), tasks=["depth_zbuffer"], image_size=2, train_buildings=["a", "b"],
                     val_buildings=["b"], test_buildings=["b"], train_slice=[0, 3], val_slice=[0, 4],
                     test_slice=[4, 100])
    assert [v.point for v in data.train.views] == ["0", "10", "11", "0", "10", "11"]  # sorted names
    assert len(data.val) == 4 and len(data.test) == 8
    assert not {v.point for v in data.val.views} & {v.point for v in data.test.views}


def test_items_are_read_lazily(tmp_path):
    raw = write_taskonomy(tmp_path, ["a"], points=1, size=4)
    data = taskonomy(root=str(tmp_path), image_size=4, train_buildings=["a"], val_buildings=["a"],
                     test_buildings=["a"])
    before = data.train[0][1]["keypoints2d"]
    expected = (raw[("a", 0, 0)]["keypoints2d"] - 50.0) / 100.0
    assert before[0].flatten().tolist() == pytest.approx(expected.flatten().tolist(), abs=1e-5)
    Image.fromarray(np.full((4, 4), 250, dtype=np.uint16)).save(taskonomy_path(tmp_path, "keypoints2d", "a", 0, 0))
    assert torch.equal(data.train[0][1]["keypoints2d"], torch.full((1, 4, 4), 2.0))


def test_resizing_matches_pillow_bilinear_and_keeps_label_ids(tmp_path):
    arrays = random_taskonomy_arrays(np.random.default_rng(2), 16)
    root = _one_view_root(tmp_path, arrays)
    x, y = _load(root, image_size=8).train[0]
    rgb = torch.from_numpy(arrays["rgb"]).permute(2, 0, 1).float() / 255
    ref = F.interpolate(rgb[None], size=(8, 8), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.allclose(x, ref, atol=1e-6)
    pil = np.asarray(Image.fromarray(arrays["rgb"]).resize((8, 8), Image.BILINEAR)).astype(np.float64)
    assert np.abs(x.permute(1, 2, 0).numpy() * 255 - pil).max() <= 1.0
    seg = arrays["segment_semantic"][1::2, 1::2].astype(np.int64)  # nearest: centre 2i + 1
    assert y["segment_semantic"].tolist() == np.where(seg == 0, -1, seg).tolist()
    depth = F.interpolate(torch.from_numpy(arrays["depth_zbuffer"].astype(np.float32))[None, None], size=(8, 8),
                          mode="bilinear", align_corners=False, antialias=True)[0]
    expected = torch.where(depth < 8192, (depth - 1500) / 1000, torch.nan)
    assert torch.allclose(y["depth_zbuffer"], expected, equal_nan=True)


def test_loader_batches_and_masked_losses(tmp_path):
    raw = write_taskonomy(tmp_path, ["a"], points=3, size=4)
    data = taskonomy(root=str(tmp_path), image_size=4, train_buildings=["a"], val_buildings=["a"],
                     test_buildings=["a"])
    x, y = next(iter(make_loader(data.train, batch_size=3, shuffle=False)))
    assert x.shape == (3, 3, 4, 4) and y["segment_semantic"].shape == (3, 4, 4)
    depth = np.stack([raw[("a", p, 0)]["depth_zbuffer"] for p in range(3)]).astype(np.float64)
    expected = np.abs(np.where(depth < 8192, (depth - 1500) / 1000, np.nan))
    task = data.task("depth_zbuffer")
    assert task.loss(torch.zeros(3, 1, 4, 4), y["depth_zbuffer"]).item() == pytest.approx(np.nanmean(expected))
    for t in data.tasks:
        pred = torch.zeros(3, t.n_outputs, 4, 4)
        assert torch.isfinite(t.loss(pred, y[t.name]))


def test_missing_task_file_is_named_or_dropped(tmp_path):
    write_taskonomy(tmp_path, ["a"], points=3, size=2)
    missing = taskonomy_path(tmp_path, "segment_semantic", "a", 1, 0)
    missing.unlink()
    kw = dict(root=str(tmp_path), image_size=2, train_buildings=["a"], val_buildings=["a"], test_buildings=["a"])
    with pytest.raises(FileNotFoundError, match=r"point_1_view_0_domain_segmentsemantic\.png"):
        taskonomy(**kw)
    data = taskonomy(drop_incomplete=True, **kw)
    assert [v.point for v in data.train.views] == ["0", "2"]
    assert data.info["dropped_incomplete_views"]["train"] == 1
    # depth is needed to mask normals even when depth is not a task
    taskonomy_path(tmp_path, "depth_zbuffer", "a", 2, 0).unlink()
    with pytest.raises(FileNotFoundError, match=r"point_2_view_0_domain_depth_zbuffer\.png"):
        taskonomy(**{**kw, "tasks": ["normal"]})
    assert len(taskonomy(**{**kw, "tasks": ["normal"], "mask_from_depth": False}).train) == 3


def test_bad_inputs_are_named(tmp_path):
    write_taskonomy(tmp_path, ["a"], points=1, size=2)
    kw = dict(root=str(tmp_path), image_size=2, train_buildings=["a"], val_buildings=["a"], test_buildings=["a"])
    with pytest.raises(ValueError, match=r"'depth'.*depth_zbuffer"):
        taskonomy(**{**kw, "tasks": ["segment_semantic", "depth"]})
    with pytest.raises(FileNotFoundError, match=r"building 'nowhere'"):
        taskonomy(**{**kw, "val_buildings": ["nowhere"]})
    with pytest.raises(FileNotFoundError, match=r"data\.test_buildings.*no_such_list\.txt"):
        taskonomy(**{**kw, "test_buildings": str(tmp_path / "no_such_list.txt")})
    with pytest.raises(ValueError, match=r"data\.train_buildings is required"):
        taskonomy(**{**kw, "train_buildings": None})
    data = taskonomy(**kw)
    seg = taskonomy_path(tmp_path, "segment_semantic", "a", 0, 0)
    Image.fromarray(np.full((2, 2), 18, dtype=np.uint8)).save(seg)
    with pytest.raises(ValueError, match=r"segmentsemantic\.png.*class id 18"):
        data.train[0]
    Image.fromarray(np.full((2, 2), 17, dtype=np.uint8)).save(seg)
    depth = taskonomy_path(tmp_path, "depth_zbuffer", "a", 0, 0)
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(depth)  # 8-bit where 16-bit is expected
    with pytest.raises(ValueError, match=r"domain_depth_zbuffer\.png.*'L'.*16-bit"):
        data.train[0]
    depth.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"cannot decode image.*domain_depth_zbuffer\.png"):
        data.train[0]
