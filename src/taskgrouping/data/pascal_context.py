"""PASCAL-Context for multi-task learning, in the PASCAL-MT layout of ASTMT, MTI-Net and InterroGate.

Maninis et al. (ASTMT, CVPR 2019) packed five dense tasks on the VOC2010 images of PASCAL-Context
into ``PASCAL_MT.tgz``; MTI-Net (Vandenhende et al.), ATRC and InterroGate (Bejnordi et al.) train on
it with its own splits. Layout (``<id>`` like ``2008_000002``)::

    root/ImageSets/Context/train.txt        4998 image ids, one per line (-> train, and validation)
    root/ImageSets/Context/val.txt          5105 image ids (-> the test split)
    root/JPEGImages/<id>.jpg                VOC2010 image (RGB, about 500 x 375)
    root/semseg/VOC12/<id>.png              8-bit class ids 0..20 (VOC: background + 20), 255 = void;
    root/semseg/pascal-context/<id>.png       read from VOC12/ when the file is there, else from here
    root/human_parts/<id>.mat               PASCAL-Part: struct ``anno`` with ``objects`` (``class_ind``,
                                              ``mask``, ``parts`` with ``part_name`` and ``mask``)
    root/sal_distill/<id>.png               8-bit saliency (distilled)
    root/normals_distill/<id>.png           8-bit RGB surface normals (distilled)
    root/pascal-context/trainval/<id>.mat   ``LabelMap``: the 459-label PASCAL-Context annotation

Tasks and targets, as MTI-Net's ``data/pascal_context.py`` builds them (the conventions of
:mod:`taskgrouping.tasks`: ``-1`` / NaN = no label):

=============== ================================================ ======================================
task            target                                           kind
=============== ================================================ ======================================
``semseg``      the semseg PNG's ids, 255 -> -1                  segmentation, 21 classes (MTI-Net)
``human_parts`` person objects (``class_ind`` 15) of the .mat:   segmentation, 7 classes: background,
                their parts, in file order, painted with the     head, torso, upper arm, lower arm
                6-part grouping (hands -> lower arm, feet ->     (+ hand), upper leg, lower leg (+ foot)
                lower leg); 0 elsewhere. Images without an
                annotated person: all -1 (see below)
``sal``         ``png / 255 > 0.5``                              segmentation, 2 classes
``normals``     ``2 png / 255 - 1``; NaN on pixels whose         normal, 3 channels, L1 (MTI-Net)
                ``LabelMap`` class is not one of the NYUv2-
                compatible classes (:data:`NORMALS_VALID_LABELS`)
``edge``        ``thin(|Laplacian(LabelMap)| > 0)``              segmentation, 2 classes
=============== ================================================ ======================================

Choices that differ from the reference code, and why:

* **Human parts of images without an annotated person** are unlabelled (-1) by default: MTI-Net
  trains them as all-background but skips them when scoring; ``human_parts_missing="background"``
  gives its training targets.
* **Normals outside the valid classes** are NaN (missing); MTI-Net sets them to 0, trains on them
  and skips them when scoring (a zero normal has no angle).
* **Edges** are computed on the ``LabelMap`` after resizing it (nearest) to ``image_size``, so they
  stay one pixel wide at any size; at the original size this is exactly MTI-Net's target.
  The Laplacian is OpenCV's 3 x 3 kernel with reflect-101 borders; ``thin`` is Guo and Hall's
  two-subiteration thinning, as in scikit-image.
* ``sal`` and ``edge`` are two-class segmentation tasks (cross-entropy, mIoU): the task kinds of
  :mod:`taskgrouping.tasks` have no per-pixel binary kind with MTI-Net's class-balanced loss nor the
  maxF / ODS-F scores of the papers.
* ``semseg_classes="context60"`` / ``"context59"`` read the semantic labels from ``LabelMap`` instead:
  the 59 frequent PASCAL-Context classes plus background (class 0), or the 59 with background
  ignored, the usual PASCAL-Context segmentation benchmarks.

Images are resized to ``image_size`` x ``image_size`` (antialiased bilinear, as Pillow's BILINEAR);
every target with nearest neighbour (ids stay ids, a missing value never blends into a valid one).
Every map must have its image's height and width. ``val.txt`` is the **test** split; a seeded
``val_fraction`` of ``train.txt`` is held out as validation (``0`` = validate on the test split,
the practice of the reference code). Items are read lazily, one image per item.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import scipy.io
import scipy.ndimage
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskgrouping.data.base import TaskData
from taskgrouping.data.image_io import (read_gray_uint8, read_rgb, resize_bilinear, resize_nearest,
                                        to_chw_float)
from taskgrouping.data.layout import dataset_root, held_out_validation, task_list
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

PASCAL_TASKS: tuple[str, ...] = ("semseg", "human_parts", "sal", "normals", "edge")
VOC_CLASSES = 21
HUMAN_PART_NAMES: tuple[str, ...] = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg",
                                     "lower_leg")
#: PASCAL-Part part name -> one of the 6 parts (MTI-Net's 6-part grouping of the 24 person parts).
HUMAN_PART_OF: dict[str, int] = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1, "rebrow": 1,
    "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "lhand": 4, "rlarm": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5, "llleg": 6, "lfoot": 6, "rlleg": 6, "rfoot": 6,
}
#: ``class_ind`` of a person in PASCAL-Part (the VOC class index).
PERSON_CLASS = 15
#: Labels of the 459-label PASCAL-Context annotation (``LabelMap`` values 0..459; 0 = unlabelled).
CONTEXT_LABELS = 459
#: The 59 frequent PASCAL-Context classes (in the benchmark's order) as ``LabelMap`` labels: aeroplane,
#: bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, cabinet, car, cat,
#: ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, floor, flower, food, grass,
#: ground, horse, keyboard, light, motorbike, mountain, mouse, person, plate, platform, pottedplant,
#: road, rock, sheep, shelves, sidewalk, sign, sky, snow, sofa, table, track, train, tree, truck,
#: tvmonitor, wall, water, window, wood.
CONTEXT59_LABELS: tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360,
    366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
#: ``LabelMap`` labels on which the distilled normals are kept: the PASCAL-Context classes that are
#: also NYUv2 classes (the distilling network was trained on NYUv2), ``unknown`` excluded, plus
#: ``tvmonitor`` -- the names shared by ASTMT's ``context_classes.json`` and ``nyu_classes.json``.
NORMALS_VALID_LABELS: tuple[int, ...] = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55,
    56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115,
    122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195,
    197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251,
    252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295,
    304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423,
    427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457)
SEMSEG_CLASSES = {"voc21": VOC_CLASSES, "context60": 60, "context59": 59}
_ID = re.compile(r"^[\w.-]+$")
#: Errors ``scipy.io.loadmat`` raises on files that are not (readable) MATLAB files.
_MAT_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, NotImplementedError,
               scipy.io.matlab.MatReadError)


def pascal_context_task(name: str, semseg_classes: str = "voc21", normal_loss: str = "l1") -> Task:
    """The :class:`Task` of a PASCAL-MT task name."""
    if name == "semseg":
        return Task(name, "segmentation", num_classes=SEMSEG_CLASSES[semseg_classes])
    if name == "human_parts":
        return Task(name, "segmentation", num_classes=len(HUMAN_PART_NAMES))
    if name in ("sal", "edge"):
        return Task(name, "segmentation", num_classes=2)
    if name == "normals":
        return Task(name, "normal", out_channels=3, loss_type=normal_loss)
    raise ValueError(f"unknown PASCAL-Context task {name!r}; expected one of {list(PASCAL_TASKS)}")


# ------------------------------------------------------------------------------------------ edges


def _guo_hall_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of Guo and Hall's two subiterations, indexed by the 8-neighbour code.

    Bit ``i`` of the code is neighbour ``x_{i+1}`` of the paper, counter-clockwise from east:
    E, NE, N, NW, W, SW, S, SE.
    """
    code = np.arange(256)
    x = [((code >> i) & 1).astype(bool) for i in range(8)]
    crossings = sum((~x[j] & (x[j + 1] | x[(j + 2) % 8])).astype(int) for j in (0, 2, 4, 6))
    n1 = sum((x[k - 1] | x[k]).astype(int) for k in (1, 3, 5, 7))
    n2 = sum((x[k] | x[(k + 1) % 8]).astype(int) for k in (1, 3, 5, 7))
    n = np.minimum(n1, n2)
    deletable = (crossings == 1) & ((n == 2) | (n == 3))
    first = deletable & ~((x[1] | x[2] | ~x[7]) & x[0])
    second = deletable & ~((x[5] | x[6] | ~x[3]) & x[4])
    return first, second


_THIN_TABLES = _guo_hall_tables()


#: weight of each neighbour in the code: E 1, NE 2, N 4, NW 8, W 16, SW 32, S 64, SE 128 (row 0 = north)
_CODE_WEIGHTS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def _neighbour_code(a: np.ndarray) -> np.ndarray:
    return scipy.ndimage.correlate(a.view(np.uint8), _CODE_WEIGHTS, mode="constant", cval=0)


def thin(mask: np.ndarray) -> np.ndarray:
    """Guo and Hall's (1989) parallel thinning of a boolean image to one-pixel-wide lines (what
    ``skimage.morphology.thin`` computes; the outside of the image counts as background)."""
    skel = np.asarray(mask, dtype=bool).copy()
    count = -1
    while count != int(skel.sum()):
        count = int(skel.sum())
        for table in _THIN_TABLES:
            skel[table[_neighbour_code(skel)]] = False
    return skel


def label_edges(label_map: np.ndarray) -> np.ndarray:
    """MTI-Net's edge target of a label map: ``thin(|Laplacian| > 0)``, the Laplacian being OpenCV's
    default (3 x 3 kernel 0 1 0 / 1 -4 1 / 0 1 0, reflect-101 border = SciPy's ``mirror``)."""
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    lap = scipy.ndimage.convolve(label_map.astype(np.float64), kernel, mode="mirror")
    return thin(lap != 0)


# ---------------------------------------------------------------------------------------- readers


def load_mat(path: Path) -> dict[str, Any]:
    """A MATLAB (v5) file's variables via ``scipy.io.loadmat`` (no code runs); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"MATLAB file {str(path)!r} does not exist")
    try:
        return scipy.io.loadmat(path)
    except _MAT_ERRORS as exc:
        raise ValueError(f"cannot read {str(path)!r} as a MATLAB (v5) file: {exc}") from None


def read_label_map(path: Path) -> np.ndarray:
    """``LabelMap`` of a PASCAL-Context ``trainval/<id>.mat`` as int64 (H, W), labels 0..459."""
    m = load_mat(path)
    if "LabelMap" not in m:
        names = sorted(k for k in m if not k.startswith("__"))
        raise ValueError(f"{str(path)!r} has no variable 'LabelMap' (it has {names}); expected PASCAL-Context's "
                         "trainval/<id>.mat")
    a = np.asarray(m["LabelMap"])
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{str(path)!r}: LabelMap has shape {a.shape} and dtype {a.dtype}; expected a 2-d "
                         "numeric label map")
    ids = np.rint(a.astype(np.float64)) if a.dtype.kind == "f" else a
    bad = (ids != a) | (ids < 0) | (ids > CONTEXT_LABELS)
    if bad.any():
        raise ValueError(f"{str(path)!r}: LabelMap holds {a[bad].flat[0].item():g}; expected integer labels "
                         f"0..{CONTEXT_LABELS}")
    return ids.astype(np.int64)


def _field(struct: np.ndarray, name: str, path: Path) -> Any:
    if struct.dtype.names is None or name not in struct.dtype.names:
        raise ValueError(f"{str(path)!r}: a struct lacks field {name!r} (it has {struct.dtype.names}); expected "
                         "PASCAL-Part's anno.objects(k).{class_ind, mask, parts(j).{part_name, mask}}")
    return struct[name]


def read_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The 7-class part map (uint8 (H, W), 0 = background) of a PASCAL-Part ``.mat``, or ``None`` when
    no person object in it has annotated parts. Later parts overwrite earlier ones, as in MTI-Net."""
    m = load_mat(path)
    if "anno" not in m:
        raise ValueError(f"{str(path)!r} has no variable 'anno'; expected a PASCAL-Part annotation")
    anno = m["anno"].reshape(-1)
    if anno.size != 1:
        raise ValueError(f"{str(path)!r}: 'anno' holds {anno.size} structs; expected one")
    objects = np.asarray(_field(anno, "objects", path)[0]).reshape(-1)
    target: np.ndarray | None = None
    for k, obj in enumerate(objects):
        cls = np.asarray(_field(obj, "class_ind", path)).reshape(-1)
        parts = np.asarray(_field(obj, "parts", path)).reshape(-1)
        if cls.size != 1 or int(cls[0]) != PERSON_CLASS or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(shape, dtype=np.uint8)
        for part in parts:
            name_arr = np.asarray(_field(part, "part_name", path)).reshape(-1)
            name = str(name_arr[0]) if name_arr.size else ""
            if name not in HUMAN_PART_OF:
                raise ValueError(f"{str(path)!r}: object {k + 1} has part {name!r}; expected one of "
                                 f"{sorted(HUMAN_PART_OF)}")
            mask = np.asarray(_field(part, "mask", path))
            if mask.shape != shape:
                raise ValueError(f"{str(path)!r}: the mask of part {name!r} is {_hw(mask.shape)}; expected the "
                                 f"image's {_hw(shape)}")
            target[mask.astype(bool)] = HUMAN_PART_OF[name]
    return target


def _hw(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape[:2]) + " (HxW)"


def _check_size(path: Path, shape: Sequence[int], image: Path, image_shape: Sequence[int]) -> None:
    if tuple(shape[:2]) != tuple(image_shape[:2]):
        raise ValueError(f"{str(path)!r} is {_hw(shape)} but its image {str(image)!r} is {_hw(image_shape)}; "
                         "expected the same size")


def _context_lut(semseg_classes: str) -> np.ndarray:
    """``LabelMap`` label -> class id of ``context60`` (0 = background) or ``context59`` (-1 = other)."""
    background = 0 if semseg_classes == "context60" else -1
    first = 1 if semseg_classes == "context60" else 0
    lut = np.full(CONTEXT_LABELS + 1, background, dtype=np.int64)
    lut[list(CONTEXT59_LABELS)] = np.arange(first, first + len(CONTEXT59_LABELS))
    return lut


_NORMALS_VALID = np.zeros(CONTEXT_LABELS + 1, dtype=bool)
_NORMALS_VALID[list(NORMALS_VALID_LABELS)] = True


def _needs_label_map(tasks: Sequence[str], semseg_classes: str, normals_mask: bool) -> bool:
    """Whether the chosen targets read ``pascal-context/trainval/<id>.mat``."""
    return ("edge" in tasks or ("semseg" in tasks and semseg_classes != "voc21")
            or ("normals" in tasks and normals_mask))


# ---------------------------------------------------------------------------------------- dataset


class PascalContextDataset(Dataset):
    """Some images of PASCAL-MT; yields ``(image, {task: target})`` read on access.

    Targets: int64 (S, S) for the segmentation tasks, float32 (3, S, S) for ``normals``.
    """

    def __init__(self, root: Path, ids: Sequence[str], tasks: Sequence[str], image_size: int,
                 semseg_files: dict[str, Path], semseg_classes: str, human_parts_missing: str,
                 normals_mask: bool) -> None:
        self.root = root
        self.ids = list(ids)
        self.tasks = list(tasks)
        self.image_size = image_size
        self.semseg_files = semseg_files
        self.semseg_classes = semseg_classes
        self.human_parts_missing = human_parts_missing
        self.normals_mask = normals_mask
        self._reads_label_map = _needs_label_map(tasks, semseg_classes, normals_mask)
        self._context_lut = torch.from_numpy(_context_lut(semseg_classes)) if semseg_classes != "voc21" else None

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, index: int, what: str) -> Path:
        """File of image ``index`` for ``what``: ``image``, a task name, or ``label_map``."""
        i = self.ids[index]
        if what == "semseg" and self.semseg_classes == "voc21":
            return self.semseg_files[i]
        return self.root / _FOLDER[what] / f"{i}{_SUFFIX[what]}"

    def _nearest(self, t: Tensor) -> Tensor:
        return resize_nearest(t, (self.image_size, self.image_size))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_path = self.path(index, "image")
        rgb = read_rgb(image_path)
        shape = rgb.shape[:2]
        s = (self.image_size, self.image_size)
        x = resize_bilinear(to_chw_float(rgb, 1 / 255), s, antialias=True)
        label_map: Tensor | None = None
        if self._reads_label_map:
            path = self.path(index, "label_map")
            a = read_label_map(path)
            _check_size(path, a.shape, image_path, shape)
            label_map = self._nearest(torch.from_numpy(a))
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            path = self.path(index, task)
            if task == "semseg":
                if self.semseg_classes == "voc21":
                    targets[task] = self._voc_semseg(path, image_path, shape)
                else:
                    targets[task] = self._context_lut[label_map]
            elif task == "human_parts":
                parts = read_human_parts(path, shape)
                if parts is None:
                    fill = -1 if self.human_parts_missing == "ignore" else 0
                    targets[task] = torch.full(s, fill, dtype=torch.int64)
                else:
                    targets[task] = self._nearest(torch.from_numpy(parts.astype(np.int64)))
            elif task == "sal":
                a = read_gray_uint8(path)
                _check_size(path, a.shape, image_path, shape)
                targets[task] = self._nearest(torch.from_numpy((a.astype(np.float64) / 255.0 > 0.5).astype(np.int64)))
            elif task == "normals":
                a = read_rgb(path)
                _check_size(path, a.shape, image_path, shape)
                n = self._nearest(to_chw_float(a)).mul_(2.0 / 255.0).sub_(1.0)
                if self.normals_mask:
                    invalid = ~torch.from_numpy(_NORMALS_VALID)[label_map]
                    n = n.masked_fill_(invalid.unsqueeze(0).expand_as(n), float("nan"))
                targets[task] = n
            else:  # edge
                targets[task] = torch.from_numpy(label_edges(label_map.numpy()).astype(np.int64))
        return x, targets

    def _voc_semseg(self, path: Path, image_path: Path, shape: tuple[int, int]) -> Tensor:
        ids = read_gray_uint8(path)
        _check_size(path, ids.shape, image_path, shape)
        bad = (ids >= VOC_CLASSES) & (ids != 255)
        if bad.any():
            raise ValueError(f"{str(path)!r} holds class id {int(ids[bad].flat[0])}; expected ids "
                             f"0..{VOC_CLASSES - 1} or 255 (void)")
        y = torch.from_numpy(ids.astype(np.int64))
        return self._nearest(y.masked_fill_(y == 255, -1))


#: folder (under root) and file suffix of each file kind
_FOLDER = {"image": "JPEGImages", "human_parts": "human_parts", "sal": "sal_distill",
           "normals": "normals_distill", "label_map": "pascal-context/trainval", "edge": "pascal-context/trainval",
           "semseg": "pascal-context/trainval"}
_SUFFIX = {"image": ".jpg", "human_parts": ".mat", "sal": ".png", "normals": ".png", "label_map": ".mat",
           "edge": ".mat", "semseg": ".mat"}


def read_split(root: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Context/<split>.txt`` (one per line, blank lines skipped)."""
    path = root / "ImageSets" / "Context" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; expected the PASCAL-MT layout with "
                                "ImageSets/Context/{train,val}.txt, JPEGImages/, semseg/, human_parts/, sal_distill/, "
                                "normals_distill/ and pascal-context/trainval/")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as text: {exc}") from None
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        i = line.strip()
        if not i:
            continue
        if not _ID.match(i):
            raise ValueError(f"{str(path)!r}, line {lineno}: {i!r} is not an image id; expected one id per line "
                             "(like 2008_000002)")
        if i in seen:
            raise ValueError(f"{str(path)!r} lists image {i!r} twice; expected each image once")
        seen.add(i)
        ids.append(i)
    if not ids:
        raise ValueError(f"{str(path)!r} lists no image; expected one image id per line")
    return ids


class _Listing:
    """File names of folders, listed once (existence checks of thousands of files)."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}

    def has(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._names:
            self._names[folder] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        return path.name in self._names[folder]


def _resolve_files(root: Path, ids: Sequence[str], kinds: Sequence[str], semseg_voc: bool,
                   listing: _Listing) -> dict[str, Path]:
    """Check that every file the chosen tasks read exists; returns the semseg file of each id (voc21)."""
    semseg: dict[str, Path] = {}
    for i in ids:
        for kind in kinds:
            path = root / _FOLDER[kind] / f"{i}{_SUFFIX[kind]}"
            if not listing.has(path):
                raise FileNotFoundError(f"{str(path)!r} is missing: image {i!r} is listed in ImageSets/Context "
                                        f"but has no {kind.replace('_', ' ')} file")
        if semseg_voc:
            voc, context = root / "semseg" / "VOC12" / f"{i}.png", root / "semseg" / "pascal-context" / f"{i}.png"
            if listing.has(voc):
                semseg[i] = voc
            elif listing.has(context):
                semseg[i] = context
            else:
                raise FileNotFoundError(f"image {i!r} has no semantic labels: neither {str(voc)!r} nor "
                                        f"{str(context)!r} exists")
    return semseg


def _choice(option: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"data.{option} must be one of {list(allowed)}, got {value!r}")
    return value


@register_dataset("pascal_context")
def pascal_context(root: str | None = None, tasks: Sequence[str] = PASCAL_TASKS, image_size: int = 128,
                   val_fraction: float = 0.1, seed: int = 0, max_per_split: int | None = None,
                   semseg_classes: Literal["voc21", "context60", "context59"] = "voc21",
                   human_parts_missing: Literal["ignore", "background"] = "ignore", normals_mask: bool = True,
                   normal_loss: Literal["l1", "cosine"] = "l1") -> TaskData:
    """PASCAL-Context's five dense tasks (PASCAL-MT layout) from ``root``; see the module docstring.

    Args:
        root: the PASCAL-MT folder (``ImageSets/``, ``JPEGImages/``, ``semseg/``, ...).
        tasks: subset of ``semseg``, ``human_parts``, ``sal``, ``normals``, ``edge`` (default all five).
        image_size: side of the square input and targets (MTI-Net trains at 512).
        val_fraction: share of ``train.txt`` held out (seeded) as validation; 0 = validate on the test split.
        seed: seed of that hold-out.
        max_per_split: keep the first ``n`` ids of ``train.txt`` (before the hold-out) and of ``val.txt``.
        semseg_classes: ``voc21`` (the semseg PNGs, MTI-Net), ``context60`` or ``context59`` (from LabelMap).
        human_parts_missing: target of images without an annotated person: ``ignore`` (-1) or ``background``.
        normals_mask: NaN normals outside the NYUv2-compatible classes (reads ``pascal-context/trainval``).
        normal_loss: ``l1`` (MTI-Net) or ``cosine``.
    """
    root_path = dataset_root(root, "pascal_context",
                             "the PASCAL-MT folder with ImageSets/, JPEGImages/, semseg/, human_parts/, ...")
    tasks = task_list(tasks, PASCAL_TASKS)
    semseg_classes = _choice("semseg_classes", semseg_classes, list(SEMSEG_CLASSES))
    human_parts_missing = _choice("human_parts_missing", human_parts_missing, ["ignore", "background"])
    normal_loss = _choice("normal_loss", normal_loss, ["l1", "cosine"])
    task_objs = [pascal_context_task(t, semseg_classes, normal_loss) for t in tasks]
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"data.image_size must be a positive integer, got {image_size!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_per_split is not None and (not isinstance(max_per_split, int) or max_per_split < 1):
        raise ValueError(f"data.max_per_split must be a positive integer or null, got {max_per_split!r}")

    kinds = ["image"] + [t for t in tasks if t in ("human_parts", "sal", "normals")]
    if _needs_label_map(tasks, semseg_classes, normals_mask):
        kinds.append("label_map")
    semseg_voc = "semseg" in tasks and semseg_classes == "voc21"
    listing = _Listing()
    train_all, test_ids = read_split(root_path, "train"), read_split(root_path, "val")
    if max_per_split:
        train_all, test_ids = train_all[:max_per_split], test_ids[:max_per_split]
    semseg_files = _resolve_files(root_path, train_all + test_ids, kinds, semseg_voc, listing)

    def subset(ids: Sequence[str]) -> PascalContextDataset:
        return PascalContextDataset(root_path, ids, tasks, image_size, semseg_files, semseg_classes,
                                    human_parts_missing, normals_mask)

    test = subset(test_ids)
    train, val = held_out_validation(train_all, test, float(val_fraction), seed, subset)
    info = {"root": str(root_path), "tasks": tasks, "image_size": image_size, "val_fraction": float(val_fraction),
            "seed": seed, "max_per_split": max_per_split, "semseg_classes": semseg_classes,
            "human_parts_missing": human_parts_missing, "normals_mask": normals_mask, "normal_loss": normal_loss,
            "validation": "held-out part of train.txt" if val_fraction > 0 else "the test split (val.txt)",
            "split_sizes": {"train": len(train), "val": len(val), "test": len(test)}}
    return TaskData(name="pascal_context", tasks=task_objs, train=train, val=val, test=test,
                    input_shape=(3, image_size, image_size), info=info)
