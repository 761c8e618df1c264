"""Cityscapes loader on tiny trees in the official layout (8-bit labelIds, 16-bit disparity and instanceIds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

from taskgrouping.data.base import make_loader
from taskgrouping.data.cityscapes import cityscapes, instance_offsets
from taskgrouping.data.registry import load_dataset

torch.set_num_threads(1)

# cityscapesScripts/helpers/labels.py: (name, id, trainId, category), transcribed for the test.
OFFICIAL_LABELS = [
    ("unlabeled", 0, 255, "void"), ("ego vehicle", 1, 255, "void"), ("rectification border", 2, 255, "void"),
    ("out of roi", 3, 255, "void"), ("static", 4, 255, "void"), ("dynamic", 5, 255, "void"),
    ("ground", 6, 255, "void"), ("road", 7, 0, "flat"), ("sidewalk", 8, 1, "flat"), ("parking", 9, 255, "flat"),
    ("rail track", 10, 255, "flat"), ("building", 11, 2, "construction"), ("wall", 12, 3, "construction"),
    ("fence", 13, 4, "construction"), ("guard rail", 14, 255, "construction"), ("bridge", 15, 255, "construction"),
    ("tunnel", 16, 255, "construction"), ("pole", 17, 5, "object"), ("polegroup", 18, 255, "object"),
    ("traffic light", 19, 6, "object"), ("traffic sign", 20, 7, "object"), ("vegetation", 21, 8, "nature"),
    ("terrain", 22, 9, "nature"), ("sky", 23, 10, "sky"), ("person", 24, 11, "human"), ("rider", 25, 12, "human"),
    ("car", 26, 13, "vehicle"), ("truck", 27, 14, "vehicle"), ("bus", 28, 15, "vehicle"),
    ("caravan", 29, 255, "vehicle"), ("trailer", 30, 255, "vehicle"), ("train", 31, 16, "vehicle"),
    ("motorcycle", 32, 17, "vehicle"), ("bicycle", 33, 18, "vehicle"),
]
CATEGORY_ORDER = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]


def frame_files(root: Path, split: str, name: str) -> dict[str, Path]:
    city = name.split("_")[0]
    return {"image": root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
            "labelIds": root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png",
            "instanceIds": root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png",
            "disparity": root / "disparity" / split / city / f"{name}_disparity.png"}


def write_frame(root: Path, split: str, name: str, arrays: dict[str, np.ndarray]) -> None:
    """One frame's official files: RGB and 8-bit label PNGs, 16-bit (mode I;16) instance and disparity PNGs."""
    paths = frame_files(root, split, name)
    for kind, a in arrays.items():
        paths[kind].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(paths[kind])
    # the colour and polygon files of gtFine exist too; the loader never reads them
    paths["labelIds"].with_name(f"{name}_gtFine_color.png").write_bytes(b"")
    paths["labelIds"].with_name(f"{name}_gtFine_polygons.json").write_text("{}")


def random_frame(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    label = rng.integers(0, 34, size=(h, w)).astype(np.uint8)
    inst = label.astype(np.uint16)
    inst[: h // 2, : w // 2] = 26001
    inst[h // 2:, w // 2:] = 24000
    disp = rng.integers(0, 30000, size=(h, w)).astype(np.uint16)
    disp[0, 0] = 0
    return {"image": rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8), "labelIds": label,
            "instanceIds": inst, "disparity": disp}


def write_cityscapes(root: Path, frames: dict[str, dict[str, int]], h: int = 4, w: int = 8,
                     seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``frames[split][city]`` frames per city, named ``<city>_<seq>_000019``; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, cities in frames.items():
        for city, n in cities.items():
            for k in range(n):
                name = f"{city}_{k:06d}_000019"
                arrays = random_frame(rng, h, w)
                write_frame(root, split, name, arrays)
                out[name] = arrays
    return out


SMALL = {"train": {"bochum": 2, "aachen": 3}, "val": {"frankfurt": 2}}


def _one_test_frame(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    root = tmp_path / "cs"
    write_cityscapes(root, {"train": {"aachen": 2}}, h=arrays["labelIds"].shape[0], w=arrays["labelIds"].shape[1])
    write_frame(root, "val", "lindau_000000_000019", arrays)
    return root


def test_label_ids_to_train_ids_and_categories(tmp_path):
    ids = np.array([lab[1] for lab in OFFICIAL_LABELS] + [7, 26], dtype=np.uint8).reshape(4, 9)
    arrays = random_frame(np.random.default_rng(0), 4, 9)
    arrays["labelIds"] = ids
    root = _one_test_frame(tmp_path, arrays)
    data = cityscapes(root=str(root), tasks=["semantic"], image_size=[4, 9], val_fraction=0)
    assert [(t.name, t.kind, t.num_classes) for t in data.tasks] == [("semantic", "segmentation", 19)]
    y = data.test[0][1]["semantic"]
    expected = [-1 if lab[2] == 255 else lab[2] for lab in OFFICIAL_LABELS] + [0, 13]
    assert y.dtype == torch.int64 and y.flatten().tolist() == expected
    assert y.flatten()[[7, 26, 33, 9, 0]].tolist() == [0, 13, 18, -1, -1]  # road, car, bicycle, parking, unlabeled
    cats = cityscapes(root=str(root), tasks=["semantic"], image_size=[4, 9], val_fraction=0, semantic_classes=7)
    assert cats.tasks[0].num_classes == 7
    expected7 = [-1 if lab[2] == 255 else CATEGORY_ORDER.index(lab[3]) for lab in OFFICIAL_LABELS] + [0, 6]
    assert cats.test[0][1]["semantic"].flatten().tolist() == expected7
    assert cats.test[0][1]["semantic"].flatten()[[7, 23, 24, 26, 29]].tolist() == [0, 4, 5, 6, -1]


def test_disparity_and_instance_offsets(tmp_path):
    arrays = random_frame(np.random.default_rng(1), 4, 6)
    arrays["disparity"] = np.array([[0, 1, 257, 65535, 513, 0]] * 4, dtype=np.uint16)
    inst = np.array([[7, 7, 26001, 26001, 26001, 23],
                     [7, 24000, 26001, 26001, 7, 23],
                     [24000, 24000, 7, 7, 7, 23],
                     [24000, 24, 7, 26002, 26002, 23]], dtype=np.uint16)
    arrays["instanceIds"] = inst
    root = _one_test_frame(tmp_path, arrays)
    data = cityscapes(root=str(root), tasks=["depth", "instance"], image_size=[4, 6], val_fraction=0)
    assert [(t.name, t.kind, t.n_outputs, t.loss_type) for t in data.tasks] == [
        ("depth", "dense_regression", 1, "l1"), ("instance", "dense_regression", 2, "l1")]
    y = data.test[0][1]
    assert y["depth"].shape == (1, 4, 6)
    assert y["depth"][0, 0].tolist() == pytest.approx([math.nan, 0.0, 1.0, 65534 / 256, 2.0, math.nan], nan_ok=True)
    off = y["instance"]
    assert off.shape == (2, 4, 6) and off.dtype == torch.float32
    # car 26001: pixels (0,2) (0,3) (0,4) (1,2) (1,3) -> centroid (0.4, 2.8)
    assert off[:, 0, 2].tolist() == pytest.approx([0.4, 0.8]) and off[:, 1, 3].tolist() == pytest.approx([-0.6, -0.2])
    # person 24000: (1,1) (2,0) (2,1) (3,0) -> centroid (2, 0.5)
    assert off[:, 3, 0].tolist() == pytest.approx([-1.0, 0.5])
    assert off[:, 3, 4].tolist() == pytest.approx([0.0, -0.5])  # car 26002: (3,3) (3,4)
    member = inst >= 1000
    assert off[0].isnan().numpy().tolist() == (~member).tolist()  # stuff and crowd pixels (< 1000): no offset
    # peer: SciPy's centre of mass of each instance
    for v in np.unique(inst[member]):
        cy, cx = scipy.ndimage.center_of_mass(inst == v)
        r, c = np.argwhere(inst == v)[0]
        assert off[:, r, c].tolist() == pytest.approx([cy - r, cx - c])


def test_resizing_and_offsets_at_the_target_size(tmp_path):
    raw = write_cityscapes(tmp_path, {"train": {"aachen": 1}, "val": {"ulm": 1}}, h=8, w=16, seed=3)
    data = cityscapes(root=str(tmp_path), tasks=["semantic", "depth", "instance"], image_size=[4, 8],
                      val_fraction=0)
    x, y = data.test[0]
    src = raw["ulm_000000_000019"]
    ref = F.interpolate(torch.from_numpy(src["image"]).permute(2, 0, 1)[None].float() / 255, size=(4, 8),
                        mode="bilinear", align_corners=False, antialias=True)[0]
    assert data.input_shape == (3, 4, 8) and torch.allclose(x, ref, atol=1e-6)
    sel = np.ix_([1, 3, 5, 7], list(range(1, 16, 2)))  # nearest: source pixel floor((i + 0.5) * 2)
    lut = {lab[1]: (-1 if lab[2] == 255 else lab[2]) for lab in OFFICIAL_LABELS}
    assert y["semantic"].tolist() == [[lut[v] for v in row] for row in src["labelIds"][sel].tolist()]
    p = src["disparity"][sel].astype(np.float64)
    assert np.allclose(y["depth"][0].numpy(), np.where(p > 0, (p - 1) / 256, np.nan), equal_nan=True)
    assert np.allclose(y["instance"].numpy(), instance_offsets(src["instanceIds"][sel]), equal_nan=True)
    assert y["instance"][:, 0, 0].tolist() == pytest.approx([0.5, 1.5])  # car block rows 0-1, cols 0-3 of the 4x8 map


def test_frames_splits_and_task_selection(tmp_path):
    write_cityscapes(tmp_path, SMALL)
    data = cityscapes(root=str(tmp_path), image_size=[4, 8], val_fraction=0)
    assert data.task_names == ["semantic", "depth"]  # MTAN's two tasks by default
    assert [f.name for f in data.train.frames] == ["aachen_000000_000019", "aachen_000001_000019",
                                                   "aachen_000002_000019", "bochum_000000_000019",
                                                   "bochum_000001_000019"]  # cities, then files, sorted
    assert [f.city for f in data.test.frames] == ["frankfurt"] * 2 and data.val is data.test
    a = cityscapes(root=str(tmp_path), image_size=[4, 8], val_fraction=0.4, seed=0)
    b = cityscapes(root=str(tmp_path), image_size=[4, 8], val_fraction=0.4, seed=0)
    c = [cityscapes(root=str(tmp_path), image_size=[4, 8], val_fraction=0.4, seed=s).val.frames for s in range(1, 6)]
    assert (len(a.train), len(a.val), len(a.test)) == (3, 2, 2)
    assert sorted(f.name for f in a.train.frames + a.val.frames) == [f.name for f in data.train.frames]
    assert a.val.frames == b.val.frames and any(v != a.val.frames for v in c)
    few = cityscapes(root=str(tmp_path), image_size=[4, 8], val_fraction=0, max_per_split=1)
    assert [f.name for f in few.train.frames] == ["aachen_000000_000019"] and len(few.test) == 1
    # only the chosen tasks' files are needed
    for p in (tmp_path / "disparity").rglob("*.png"):
        p.unlink()
    sem = load_dataset("cityscapes", root=str(tmp_path), tasks=["semantic"], image_size=[4, 8], val_fraction=0)
    assert set(sem.train[0][1]) == {"semantic"}
    with pytest.raises(FileNotFoundError, match=r"disparity/train/aachen/aachen_000000_000019_disparity\.png' is "
                                                r"missing.*task 'depth'"):
        cityscapes(root=str(tmp_path), image_size=[4, 8])


def test_batches_and_losses(tmp_path):
    write_cityscapes(tmp_path, SMALL, h=4, w=8)
    data = cityscapes(root=str(tmp_path), tasks=["semantic", "depth", "instance"], image_size=[2, 4],
                      val_fraction=0)
    x, y = next(iter(make_loader(data.train, batch_size=3, shuffle=False)))
    assert x.shape == (3, 3, 2, 4) and y["semantic"].shape == (3, 2, 4) and y["instance"].shape == (3, 2, 2, 4)
    g = torch.Generator().manual_seed(0)
    for t in data.tasks:
        assert math.isfinite(t.loss(torch.randn(3, t.n_outputs, 2, 4, generator=g), y[t.name]).item())
    d = y["depth"]
    valid = ~d.isnan()
    expected = (torch.zeros_like(d) - torch.nan_to_num(d)).abs()[valid].mean()
    assert data.task("depth").loss(torch.zeros_like(d), d).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_inputs_are_named(tmp_path):
    write_cityscapes(tmp_path, SMALL)
    kw = dict(root=str(tmp_path), image_size=[4, 8], val_fraction=0)
    with pytest.raises(ValueError, match=r"data\.root is required"):
        cityscapes()
    with pytest.raises(FileNotFoundError, match=r"nowhere/leftImg8bit/train' does not exist"):
        (tmp_path / "nowhere").mkdir()
        cityscapes(**{**kw, "root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"unknown Cityscapes task 'normal'"):
        cityscapes(**kw, tasks=["semantic", "normal"])
    with pytest.raises(ValueError, match=r"data\.semantic_classes must be 19 \(train ids\) or 7 \(categories\), "
                                         r"got 20"):
        cityscapes(**kw, semantic_classes=20)
    with pytest.raises(ValueError, match=r"data\.image_size must be \[height, width\]"):
        cityscapes(**{**kw, "image_size": 128})
    with pytest.raises(ValueError, match=r"data\.semantic_classes"):
        load_dataset("cityscapes", root=str(tmp_path), semantic_classes="19")
    with pytest.raises(ValueError, match=r"data\.coarse"):
        load_dataset("cityscapes", root=str(tmp_path), coarse=True)
    files = frame_files(tmp_path, "val", "frankfurt_000001_000019")
    files["labelIds"].unlink()
    with pytest.raises(FileNotFoundError, match=r"gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds\.png' "
                                                r"is missing"):
        cityscapes(**kw)
    Image.fromarray(np.full((4, 8), 34, dtype=np.uint8)).save(files["labelIds"])
    data = cityscapes(**kw)
    with pytest.raises(ValueError, match=r"labelIds\.png' holds label id 34; expected ids 0\.\.33"):
        data.test[1]
    Image.fromarray(np.zeros((4, 7), dtype=np.uint8)).save(files["labelIds"])
    with pytest.raises(ValueError, match=r"labelIds\.png' is 4x7 \(HxW\) but its image .*leftImg8bit\.png' is "
                                         r"4x8 \(HxW\); expected the same size"):
        data.test[1]
    Image.fromarray(np.zeros((4, 8), dtype=np.uint8)).save(files["labelIds"])
    Image.fromarray(np.zeros((4, 8), dtype=np.uint8)).save(files["disparity"])  # 8-bit where 16-bit is expected
    with pytest.raises(ValueError, match=r"_disparity\.png' has mode 'L'; expected a 16-bit"):
        data.test[1]
    files["image"].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"cannot decode image .*frankfurt_000001_000019_leftImg8bit\.png"):
        data.test[1]
    for p in (tmp_path / "leftImg8bit" / "val" / "frankfurt").iterdir():
        p.rename(p.with_name(p.name.replace("_leftImg8bit", "_left")))
    with pytest.raises(ValueError, match=r"leftImg8bit/val' holds no <city>/<city>_<seq>_<frame>_leftImg8bit\.png"):
        cityscapes(**kw)
