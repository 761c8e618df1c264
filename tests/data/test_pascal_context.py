"""PASCAL-Context loader on tiny copies of the PASCAL-MT layout (ASTMT / MTI-Net / InterroGate).

The fixtures are written in the dataset's own formats: JPEG images, palette PNG label maps, 8-bit
saliency and RGB normal PNGs, PASCAL-Part ``anno`` structs and PASCAL-Context ``LabelMap`` files
saved with ``scipy.io.savemat`` (readable by MTI-Net's positional indexing
``loadmat(f)['anno'][0][0][1][0][k][1][0][0]``, which the first test checks).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from taskgrouping.data.base import make_loader
from taskgrouping.data.pascal_context import label_edges, pascal_context, thin
from taskgrouping.data.registry import load_dataset

torch.set_num_threads(1)

# LabelMap labels (PASCAL-Context's 459-label list, 1-based alphabetical): aeroplane 2, person 284,
# tvmonitor 427, unknown 431.
AEROPLANE, PERSON, TVMONITOR, UNKNOWN = 2, 284, 427, 431
VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]

# ------------------------------------------------------------------------------------------- writers


def _parts_struct(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0))
    arr = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
    for j, (name, mask) in enumerate(parts):
        arr[0, j] = (name, mask.astype(np.uint8))
    return arr


def write_parts_mat(path: Path, objects: list[tuple[str, int, np.ndarray, list]]) -> None:
    """A PASCAL-Part annotation: ``anno`` = struct(imname, objects(class, class_ind, mask, parts))."""
    objs = np.empty((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for k, (cls, ind, mask, parts) in enumerate(objects):
        objs[0, k] = (cls, np.array([[ind]], dtype=np.uint8), mask.astype(np.uint8), _parts_struct(parts))
    anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (path.stem + ".jpg", objs)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"anno": anno})


def write_label_map(path: Path, label_map: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"LabelMap": label_map.astype(np.uint16)})


def write_png(path: Path, a: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(a)
    if palette:  # VOC's label PNGs: palette indices are the class ids
        im.putpalette(VOC_PALETTE)
    im.save(path)


def write_image(root: Path, i: str, rgb: np.ndarray) -> None:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{i}.jpg", quality=95)


def write_pascal_mt(root: Path, train: list[str], val: list[str], h: int = 6, w: int = 6,
                    seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Every PASCAL-MT file of ``train`` + ``val`` ids (random, valid content); returns the raw arrays.
    Even-numbered images get their semseg under VOC12/, the others under pascal-context/."""
    rng = np.random.default_rng(seed)
    (root / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / "ImageSets" / "Context" / "val.txt").write_text("".join(f"{i}\n" for i in val) + "\n")
    out = {}
    for n, i in enumerate(train + val):
        semseg = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
        semseg[0, 0] = 255
        person = np.zeros((h, w), dtype=bool)
        person[: h // 2, : w // 2] = True
        arrays = {"image": rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8), "semseg": semseg,
                  "sal": rng.integers(0, 256, size=(h, w)).astype(np.uint8),
                  "normals": rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8),
                  "label_map": rng.choice([AEROPLANE, PERSON, TVMONITOR, UNKNOWN, 0], size=(h, w)),
                  "person": person}
        write_image(root, i, arrays["image"])
        folder = "VOC12" if n % 2 == 0 else "pascal-context"
        write_png(root / "semseg" / folder / f"{i}.png", semseg, palette=True)
        write_png(root / "sal_distill" / f"{i}.png", arrays["sal"])
        write_png(root / "normals_distill" / f"{i}.png", arrays["normals"])
        write_label_map(root / "pascal-context" / "trainval" / f"{i}.mat", arrays["label_map"])
        write_parts_mat(root / "human_parts" / f"{i}.mat",
                        [("person", 15, person, [("head", person), ("torso", person & (np.arange(w) == 0))])])
        out[i] = arrays
    return out


IDS = [f"2008_{k:06d}" for k in range(10)]
TEST_IDS = [f"2010_{k:06d}" for k in range(4)]


def _hand_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """One test image (6 x 6) whose every target is written by hand."""
    root = tmp_path / "PASCAL_MT"
    write_pascal_mt(root, IDS[:2], ["2010_000001"])
    i = "2010_000001"
    label_map = np.array([[PERSON] * 3 + [TVMONITOR] * 3] * 3 + [[AEROPLANE] * 3 + [UNKNOWN] * 3] * 3)
    write_label_map(root / "pascal-context" / "trainval" / f"{i}.mat", label_map)
    voc = np.zeros((6, 6), dtype=np.uint8)
    voc[0] = [0, 15, 20, 255, 1, 2]
    write_png(root / "semseg" / "VOC12" / f"{i}.png", voc, palette=True)
    write_png(root / "semseg" / "pascal-context" / f"{i}.png", np.full((6, 6), 3, dtype=np.uint8), palette=True)
    sal = np.zeros((6, 6), dtype=np.uint8)
    sal[0, :4] = [0, 127, 128, 255]
    write_png(root / "sal_distill" / f"{i}.png", sal)
    normals = np.zeros((6, 6, 3), dtype=np.uint8)
    normals[0, 0] = [0, 255, 128]
    normals[4, 4] = [255, 255, 255]
    write_png(root / "normals_distill" / f"{i}.png", normals)
    m = np.zeros((6, 6), dtype=bool)

    def box(r0, r1, c0, c1):
        b = m.copy()
        b[r0:r1, c0:c1] = True
        return b

    everything = ~m
    write_parts_mat(root / "human_parts" / f"{i}.mat", [
        ("person", 15, everything, [("head", box(0, 2, 0, 2)), ("torso", box(2, 4, 0, 2)), ("lhand", box(3, 4, 0, 3))]),
        ("dog", 12, everything, [("head", box(4, 6, 4, 6))]),  # not a person: ignored
        ("person", 15, box(0, 1, 5, 6), []),  # a person without parts adds nothing
        ("person", 15, everything, [("ruleg", box(4, 5, 0, 2)), ("rfoot", box(5, 6, 0, 2))]),
    ])
    return root, {"label_map": label_map, "voc": voc, "normals": normals}


# ------------------------------------------------------------------------------------------- targets


def test_targets_of_a_hand_written_image(tmp_path):
    root, raw = _hand_root(tmp_path)
    mat = scipy.io.loadmat(root / "human_parts" / "2010_000001.mat")
    assert mat["anno"][0][0][1][0][0][1][0][0] == 15  # MTI-Net's positional reading of the same file
    data = pascal_context(root=str(root), image_size=6, val_fraction=0)
    assert [(t.name, t.kind, t.n_outputs, t.loss_type) for t in data.tasks] == [
        ("semseg", "segmentation", 21, "ce"), ("human_parts", "segmentation", 7, "ce"),
        ("sal", "segmentation", 2, "ce"), ("normals", "normal", 3, "l1"), ("edge", "segmentation", 2, "ce")]
    assert data.input_shape == (3, 6, 6) and data.test.ids == ["2010_000001"]
    x, y = data.test[0]
    jpeg = np.array(Image.open(root / "JPEGImages" / "2010_000001.jpg").convert("RGB"))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.from_numpy(jpeg).permute(2, 0, 1) / 255.0)
    # semseg: VOC12/ wins over pascal-context/, 255 (void) -> -1
    assert y["semseg"].dtype == torch.int64 and y["semseg"][0].tolist() == [0, 15, 20, -1, 1, 2]
    assert (y["semseg"][1:] == 0).all()
    expected_parts = np.zeros((6, 6), dtype=np.int64)
    expected_parts[0:2, 0:2] = 1  # head
    expected_parts[2:4, 0:2] = 2  # torso
    expected_parts[3, 0:3] = 4  # left hand -> lower arm, painted after the torso
    expected_parts[4, 0:2] = 5  # right upper leg
    expected_parts[5, 0:2] = 6  # right foot -> lower leg
    assert y["human_parts"].tolist() == expected_parts.tolist()
    assert y["sal"][0, :4].tolist() == [0, 0, 1, 1] and y["sal"].sum() == 2  # 127/255 < 0.5 < 128/255
    n = y["normals"]
    assert n.shape == (3, 6, 6) and n.dtype == torch.float32
    assert n[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 2 * 128 / 255 - 1], abs=1e-6)  # person: valid
    assert n[:, 1, 4].tolist() == pytest.approx([-1.0, -1.0, -1.0])  # tvmonitor: valid (MTI-Net's addition)
    assert n[:, 3:].isnan().all() and not n[:, :3].isnan().any()  # aeroplane, unknown: no NYUv2 normals
    edge = y["edge"]
    band = np.zeros((6, 6), dtype=bool)  # pixels with a 4-neighbour of another label
    band[:, 2:4] = band[2:4, :] = True
    assert edge.dtype == torch.int64 and set(edge.unique().tolist()) <= {0, 1}
    assert not (edge.numpy().astype(bool) & ~band).any() and edge.sum() == 7
    assert edge.tolist() == [[0] * 6] * 3 + [[1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]]


def test_thinning_and_edges_match_the_reference_outputs():
    # scikit-image's documented example of skimage.morphology.thin
    square = np.zeros((7, 7), dtype=bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    assert thin(square).astype(int).tolist() == [
        [0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    # invariants: idempotent, never adds a pixel, keeps a one-pixel line
    rng = np.random.default_rng(0)
    blob = rng.random((20, 20)) < 0.6
    once = thin(blob)
    assert np.array_equal(thin(once), once) and not (once & ~blob).any()
    line = np.zeros((5, 9), dtype=bool)
    line[2, 1:8] = True
    assert np.array_equal(thin(line), line)
    # a vertical boundary: OpenCV's Laplacian marks columns 2 and 3; thinning (as scikit-image does,
    # output recorded from cv2.Laplacian + skimage.morphology.thin) keeps one column, minus its first pixel
    lm = np.zeros((6, 6), dtype=np.int64)
    lm[:, 3:] = 7
    assert label_edges(lm)[:, 2].tolist() == [False] + [True] * 5 and label_edges(lm).sum() == 5
    assert not label_edges(np.full((4, 5), 9)).any()
    # the border is reflect-101 (OpenCV's default): at (1, 0) the Laplacian is 3 + 3 + 1 + 1 - 4 * 2 = 0,
    # so no edge there (a replicated border would give 3 + 3 + 1 + 2 - 8 = 1); recorded from OpenCV + scikit-image
    border = np.array([[3, 1, 1, 1], [2, 1, 1, 1], [3, 1, 1, 1], [3, 1, 1, 1]])
    assert label_edges(border).astype(int).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]


def test_context_classes_from_label_map(tmp_path):
    root, _ = _hand_root(tmp_path)
    # the 60-class benchmark: background, then aeroplane (1), ..., person (37), ..., tvmonitor (55), ...
    data60 = pascal_context(root=str(root), tasks=["semseg"], image_size=6, val_fraction=0,
                            semseg_classes="context60")
    assert data60.tasks[0].num_classes == 60
    y = data60.test[0][1]["semseg"]
    assert y[0].tolist() == [37] * 3 + [55] * 3 and y[5].tolist() == [1] * 3 + [0] * 3
    data59 = pascal_context(root=str(root), tasks=["semseg"], image_size=6, val_fraction=0,
                            semseg_classes="context59")
    y = data59.test[0][1]["semseg"]
    assert data59.tasks[0].num_classes == 59
    assert y[0].tolist() == [36] * 3 + [54] * 3 and y[5].tolist() == [0] * 3 + [-1] * 3


def test_images_without_person_parts(tmp_path):
    root, _ = _hand_root(tmp_path)
    i = IDS[0]
    write_parts_mat(root / "human_parts" / f"{i}.mat", [("person", 15, np.ones((6, 6)), []),
                                                        ("cat", 8, np.ones((6, 6)), [])])
    data = pascal_context(root=str(root), tasks=["human_parts"], image_size=6, val_fraction=0)
    assert data.train.ids[0] == i
    assert (data.train[0][1]["human_parts"] == -1).all()  # unlabelled: MTI-Net skips it when scoring
    assert (data.train[1][1]["human_parts"] >= 0).all()
    bg = pascal_context(root=str(root), tasks=["human_parts"], image_size=6, val_fraction=0,
                        human_parts_missing="background")
    assert (bg.train[0][1]["human_parts"] == 0).all()  # MTI-Net's training target
    write_parts_mat(root / "human_parts" / f"{i}.mat", [])  # no object at all
    assert (data.train[0][1]["human_parts"] == -1).all()


def test_resizing_bilinear_image_nearest_targets(tmp_path):
    root = tmp_path / "p"
    raw = write_pascal_mt(root, IDS[:2], TEST_IDS[:1], h=8, w=12)
    x, y = pascal_context(root=str(root), image_size=4, val_fraction=0).test[0]
    src = raw[TEST_IDS[0]]
    jpeg = np.array(Image.open(root / "JPEGImages" / f"{TEST_IDS[0]}.jpg").convert("RGB"))
    ref = F.interpolate(torch.from_numpy(jpeg).permute(2, 0, 1)[None].float() / 255, size=(4, 4), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    assert x.shape == (3, 4, 4) and torch.allclose(x, ref, atol=1e-6)
    pil = np.asarray(Image.fromarray(jpeg).resize((4, 4), Image.BILINEAR)).astype(np.float64)
    assert np.abs(x.permute(1, 2, 0).numpy() * 255 - pil).max() <= 1.0
    rows, cols = [1, 3, 5, 7], [1, 4, 7, 10]  # nearest: source pixel floor((i + 0.5) * scale)
    seg = src["semseg"][np.ix_(rows, cols)].astype(np.int64)
    assert y["semseg"].tolist() == np.where(seg == 255, -1, seg).tolist()
    assert y["sal"].tolist() == (src["sal"][np.ix_(rows, cols)] >= 128).astype(int).tolist()
    normals = src["normals"][np.ix_(rows, cols)].astype(np.float64) * 2 / 255 - 1
    valid = np.isin(src["label_map"][np.ix_(rows, cols)], [PERSON, TVMONITOR])
    expected = np.where(valid[..., None], normals, np.nan).transpose(2, 0, 1)
    assert np.allclose(y["normals"].numpy(), expected, equal_nan=True, atol=1e-6)
    assert y["edge"].tolist() == label_edges(src["label_map"][np.ix_(rows, cols)]).astype(int).tolist()


# -------------------------------------------------------------------------------- splits and tasks


def test_splits_hold_out_part_of_train(tmp_path):
    write_pascal_mt(tmp_path, IDS, TEST_IDS, h=2, w=2)
    a = pascal_context(root=str(tmp_path), image_size=2, val_fraction=0.2, seed=0)
    b = pascal_context(root=str(tmp_path), image_size=2, val_fraction=0.2, seed=0)
    c = pascal_context(root=str(tmp_path), image_size=2, val_fraction=0.2, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (8, 2, 4)
    assert sorted(a.train.ids + a.val.ids) == IDS and not set(a.train.ids) & set(a.val.ids)
    assert a.test.ids == TEST_IDS  # val.txt is the test split, in file order
    assert a.val.ids == b.val.ids and a.val.ids != c.val.ids
    same = pascal_context(root=str(tmp_path), image_size=2, val_fraction=0)
    assert same.train.ids == IDS and same.val is same.test
    few = pascal_context(root=str(tmp_path), image_size=2, val_fraction=0.5, max_per_split=4)
    assert sorted(few.train.ids + few.val.ids) == IDS[:4] and few.test.ids == TEST_IDS[:4]
    assert few.info["split_sizes"] == {"train": 2, "val": 2, "test": 4}


def test_task_selection_reads_only_its_files(tmp_path):
    write_pascal_mt(tmp_path, IDS[:3], TEST_IDS[:2], h=3, w=3)
    for folder in ("normals_distill", "human_parts"):
        for p in (tmp_path / folder).iterdir():
            p.unlink()
    for p in (tmp_path / "pascal-context" / "trainval").iterdir():
        p.unlink()
    data = load_dataset("pascal_context", root=str(tmp_path), tasks=["sal", "semseg"], image_size=3, val_fraction=0)
    assert data.task_names == ["sal", "semseg"] and set(data.train[0][1]) == {"sal", "semseg"}
    with pytest.raises(FileNotFoundError, match=r"normals_distill/2008_000000\.png' is missing"):
        pascal_context(root=str(tmp_path), tasks=["normals"], image_size=3)
    write_pascal_mt(tmp_path, IDS[:3], TEST_IDS[:2], h=3, w=3)
    for p in (tmp_path / "pascal-context" / "trainval").iterdir():
        p.unlink()
    plain = pascal_context(root=str(tmp_path), tasks=["normals"], image_size=3, normals_mask=False,
                           val_fraction=0)
    assert not plain.test[0][1]["normals"].isnan().any()  # no mask: every normal kept
    with pytest.raises(FileNotFoundError, match=r"pascal-context/trainval/2008_000000\.mat' is missing"):
        pascal_context(root=str(tmp_path), tasks=["edge"], image_size=3)


def test_batches_and_losses(tmp_path):
    write_pascal_mt(tmp_path, IDS[:3], TEST_IDS[:2], h=5, w=7)
    data = pascal_context(root=str(tmp_path), image_size=4, val_fraction=0, normal_loss="cosine")
    x, y = next(iter(make_loader(data.train, batch_size=3, shuffle=False)))
    assert x.shape == (3, 3, 4, 4) and y["human_parts"].shape == (3, 4, 4) and y["normals"].shape == (3, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    for t in data.tasks:
        pred = torch.randn(3, t.n_outputs, 4, 4, generator=g)
        assert math.isfinite(t.loss(pred, y[t.name]).item())
    logits = torch.randn(3, 21, 4, 4, generator=g)
    ce = F.cross_entropy(logits, y["semseg"], ignore_index=-1)
    assert data.task("semseg").loss(logits, y["semseg"]).item() == pytest.approx(ce.item(), rel=1e-5)
    assert data.task("normals").loss_type == "cosine"


# ------------------------------------------------------------------------------------------ errors


def test_bad_layout_and_options_are_named(tmp_path):
    write_pascal_mt(tmp_path, IDS[:2], TEST_IDS[:1], h=3, w=3)
    kw = dict(root=str(tmp_path), image_size=3)
    with pytest.raises(ValueError, match=r"data\.root is required"):
        pascal_context(image_size=3)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*not a directory"):
        pascal_context(root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"unknown PASCAL-Context task 'depth'"):
        pascal_context(**kw, tasks=["semseg", "depth"])
    with pytest.raises(ValueError, match=r"data\.semseg_classes must be one of .*'voc21'.*got 'context33'"):
        pascal_context(**kw, semseg_classes="context33")
    with pytest.raises(ValueError, match=r"data\.human_parts_missing"):
        pascal_context(**kw, human_parts_missing="zero")
    with pytest.raises(ValueError, match=r"data\.image_size must be a positive integer"):
        pascal_context(root=str(tmp_path), image_size=0)
    with pytest.raises(ValueError, match=r"data\.tasks repeats"):
        pascal_context(**kw, tasks=["sal", "sal"])
    with pytest.raises(ValueError, match=r"data\.crop"):
        load_dataset("pascal_context", root=str(tmp_path), crop=True)
    with pytest.raises(ValueError, match=r"data\.normals_mask"):
        load_dataset("pascal_context", root=str(tmp_path), normals_mask="yes")
    (tmp_path / "ImageSets" / "Context" / "val.txt").write_text("2010_000000\n2010_000000\n")
    with pytest.raises(ValueError, match=r"val\.txt' lists image '2010_000000' twice"):
        pascal_context(**kw)
    (tmp_path / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Context/val\.txt' does not exist"):
        pascal_context(**kw)


def test_missing_and_bad_files_are_named(tmp_path):
    write_pascal_mt(tmp_path, IDS[:2], TEST_IDS[:2], h=3, w=3)
    kw = dict(root=str(tmp_path), image_size=3, val_fraction=0)
    (tmp_path / "JPEGImages" / f"{IDS[1]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2008_000001\.jpg' is missing"):
        pascal_context(**kw)
    write_image(tmp_path, IDS[1], np.zeros((3, 3, 3), dtype=np.uint8))
    (tmp_path / "semseg" / "pascal-context" / f"{TEST_IDS[1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'2010_000001' has no semantic labels: neither .*VOC12/2010_000001"
                                                r"\.png' nor .*pascal-context/2010_000001\.png'"):
        pascal_context(**kw)
    write_png(tmp_path / "semseg" / "pascal-context" / f"{TEST_IDS[1]}.png", np.full((3, 3), 30, np.uint8), True)
    data = pascal_context(**kw)
    with pytest.raises(ValueError, match=r"pascal-context/2010_000001\.png' holds class id 30; expected ids 0\.\.20"):
        data.test[1]
    write_png(tmp_path / "semseg" / "pascal-context" / f"{TEST_IDS[1]}.png", np.zeros((4, 3), np.uint8), True)
    with pytest.raises(ValueError, match=r"2010_000001\.png' is 4x3 \(HxW\) but its image .*2010_000001\.jpg' is "
                                         r"3x3 \(HxW\); expected the same size"):
        data.test[1]
    (tmp_path / "JPEGImages" / f"{IDS[0]}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode image .*2008_000000\.jpg"):
        data.train[0]
    write_image(tmp_path, IDS[0], np.zeros((3, 3, 3), dtype=np.uint8))
    (tmp_path / "human_parts" / f"{IDS[0]}.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(ValueError, match=r"cannot read .*human_parts/2008_000000\.mat' as a MATLAB"):
        data.train[0]
    write_parts_mat(tmp_path / "human_parts" / f"{IDS[0]}.mat", [("person", 15, np.ones((3, 3)),
                                                                 [("tail", np.ones((3, 3)))])])
    with pytest.raises(ValueError, match=r"human_parts/2008_000000\.mat': object 1 has part 'tail'"):
        data.train[0]
    write_parts_mat(tmp_path / "human_parts" / f"{IDS[0]}.mat", [("person", 15, np.ones((3, 3)),
                                                                 [("head", np.ones((2, 3)))])])
    with pytest.raises(ValueError, match=r"the mask of part 'head' is 2x3 \(HxW\); expected the image's 3x3"):
        data.train[0]
    write_parts_mat(tmp_path / "human_parts" / f"{IDS[0]}.mat", [])
    scipy.io.savemat(tmp_path / "pascal-context" / "trainval" / f"{IDS[0]}.mat", {"labels": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"trainval/2008_000000\.mat' has no variable 'LabelMap'"):
        data.train[0]
    write_label_map(tmp_path / "pascal-context" / "trainval" / f"{IDS[0]}.mat", np.full((3, 3), 460))
    with pytest.raises(ValueError, match=r"LabelMap holds 460; expected integer labels 0\.\.459"):
        data.train[0]
