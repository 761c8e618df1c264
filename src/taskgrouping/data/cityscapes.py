"""Cityscapes from its official files: semantic segmentation, depth (disparity), instance offsets.

Layout of the official packages (``leftImg8bit_trainvaltest``, ``gtFine_trainvaltest``,
``disparity_trainvaltest``), ``<frame>`` = ``<city>_<sequence>_<frame number>``::

    root/leftImg8bit/{train,val}/<city>/<frame>_leftImg8bit.png     8-bit RGB, 2048 x 1024
    root/gtFine/{train,val}/<city>/<frame>_gtFine_labelIds.png      8-bit label ids 0..33
    root/gtFine/{train,val}/<city>/<frame>_gtFine_instanceIds.png   16-bit: id * 1000 + k for the
                                                                    pixels of instance k, else the label id
    root/disparity/{train,val}/<city>/<frame>_disparity.png         16-bit p: disparity (p - 1) / 256
                                                                    pixels where p > 0; p = 0 invalid

Frames are the ``*_leftImg8bit.png`` files of each city folder, cities and files sorted by name; the
other files are found from the frame's name, never by replacing text in a path. Only the files the
chosen tasks read must exist. ``test`` has no public labels and is never read.

Tasks and targets (the conventions of :mod:`taskgrouping.tasks`: ``-1`` / NaN = no label):

* ``semantic``: segmentation. ``semantic_classes=19``: label id -> train id with the official table
  of ``cityscapesScripts/helpers/labels.py`` (:data:`TRAIN_ID`); ids whose train id is 255 -> -1.
  ``semantic_classes=7``: the 7 categories of the 19 classes (flat, construction, object, nature,
  sky, human, vehicle: the official category id - 1), the rest -1 -- the classes the official
  category score counts (parking, rail track, guard rail, bridge, tunnel, pole group, caravan and
  trailer are ignored there, as in the 19-class score). MTAN (Liu et al.) trains 7 or 19 classes.
* ``depth``: dense regression, L1, the **disparity in pixels** ``(p - 1) / 256`` (inverse depth,
  what MTAN's Cityscapes predicts), NaN where ``p = 0``. Values stay in pixels of the full-size
  image whatever ``image_size`` is.
* ``instance`` (opt-in): dense regression, 2 channels, L1: for every pixel of an instance, the
  offset (dy, dx) from the pixel to its instance's centroid, in pixels of the resized map (Kendall
  et al., CVPR 2018); NaN on pixels of no instance.

Images are resized to ``image_size`` = (height, width) (default 128 x 256, MTAN's) with antialiased
bilinear interpolation (as Pillow's BILINEAR); label ids, disparity and instance ids with nearest
neighbour, before any conversion (a label stays a label, an invalid disparity never blends into a
valid one). Every map must have its image's size.

Splits: the official ``val`` is the **test** split (the ``test`` labels are not public); a seeded
``val_fraction`` of the official ``train`` frames (per frame, like the NYUv2 loader) is held out as
validation; ``val_fraction=0`` validates on the test split (MTAN's practice). Items are read lazily.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskgrouping.data.base import TaskData
from taskgrouping.data.image_io import (read_gray_uint8, read_gray_uint16, read_rgb, resize_bilinear,
                                        resize_nearest, to_chw_float)
from taskgrouping.data.layout import dataset_root, held_out_validation, task_list
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

CITYSCAPES_TASKS: tuple[str, ...] = ("semantic", "depth", "instance")
DEFAULT_TASKS: tuple[str, ...] = ("semantic", "depth")
#: Label ids 0..33 of ``*_gtFine_labelIds.png``.
NUM_LABEL_IDS = 34
#: label id -> train id (255 = ignored), ``cityscapesScripts/helpers/labels.py``.
TRAIN_ID: tuple[int, ...] = (255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255,
                             6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18)
#: label id -> category id (0 void, 1 flat, 2 construction, 3 object, 4 nature, 5 sky, 6 human, 7 vehicle).
CATEGORY_ID: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 6, 6, 7, 7, 7,
                                7, 7, 7, 7, 7)
TRAIN_CLASSES: tuple[str, ...] = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                                  "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                                  "truck", "bus", "train", "motorcycle", "bicycle")
CATEGORIES: tuple[str, ...] = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
#: Instance-id values from this on are ``label id * 1000 + k`` (one instance); below, a plain label id.
INSTANCE_OFFSET = 1000
_FRAME_NAME = re.compile(r"^(.+_\d+_\d+)_leftImg8bit\.png$")
#: task / input -> (top folder, file suffix after the frame name)
_FILES = {"image": ("leftImg8bit", "_leftImg8bit.png"), "semantic": ("gtFine", "_gtFine_labelIds.png"),
          "depth": ("disparity", "_disparity.png"), "instance": ("gtFine", "_gtFine_instanceIds.png")}


def _lookup(semantic_classes: int) -> np.ndarray:
    """label id -> class id of the 19 train classes or of the 7 categories; -1 = ignored."""
    train = np.array(TRAIN_ID, dtype=np.int64)
    if semantic_classes == 19:
        return np.where(train == 255, -1, train)
    return np.where(train == 255, -1, np.array(CATEGORY_ID, dtype=np.int64) - 1)


def cityscapes_task(name: str, semantic_classes: int = 19) -> Task:
    """The :class:`Task` of a Cityscapes task name."""
    if name == "semantic":
        return Task(name, "segmentation", num_classes=semantic_classes)
    if name == "depth":
        return Task(name, "dense_regression", out_channels=1, loss_type="l1")
    if name == "instance":
        return Task(name, "dense_regression", out_channels=2, loss_type="l1")
    raise ValueError(f"unknown Cityscapes task {name!r}; expected one of {list(CITYSCAPES_TASKS)}")


def instance_offsets(instance_ids: np.ndarray) -> np.ndarray:
    """float32 (2, H, W): (centroid row - row, centroid column - column) of each pixel's instance
    (values >= :data:`INSTANCE_OFFSET`), NaN elsewhere."""
    h, w = instance_ids.shape
    out = np.full((2, h, w), np.nan, dtype=np.float32)
    member = instance_ids >= INSTANCE_OFFSET
    if not member.any():
        return out
    labels, inverse = np.unique(instance_ids[member], return_inverse=True)
    rows, cols = np.nonzero(member)
    counts = np.bincount(inverse, minlength=labels.size)
    cy = np.bincount(inverse, weights=rows, minlength=labels.size) / counts
    cx = np.bincount(inverse, weights=cols, minlength=labels.size) / counts
    out[0, rows, cols] = cy[inverse] - rows
    out[1, rows, cols] = cx[inverse] - cols
    return out


@dataclass(frozen=True)
class Frame:
    """One Cityscapes frame: its split folder, city and name (``<city>_<sequence>_<frame number>``)."""

    split: str
    city: str
    name: str


def frame_path(root: Path, frame: Frame, what: str) -> Path:
    """The file of ``frame`` for ``what`` (``image`` or a task name)."""
    top, suffix = _FILES[what]
    return root / top / frame.split / frame.city / f"{frame.name}{suffix}"


class CityscapesDataset(Dataset):
    """Some Cityscapes frames; yields ``(image, {task: target})`` read on access."""

    def __init__(self, root: Path, frames: Sequence[Frame], tasks: Sequence[str], size: tuple[int, int],
                 semantic_classes: int) -> None:
        self.root = root
        self.frames = list(frames)
        self.tasks = list(tasks)
        self.size = size
        self.semantic_classes = semantic_classes
        self._lut = torch.from_numpy(_lookup(semantic_classes))

    def __len__(self) -> int:
        return len(self.frames)

    def path(self, index: int, what: str) -> Path:
        return frame_path(self.root, self.frames[index], what)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_path = self.path(index, "image")
        rgb = read_rgb(image_path)
        x = resize_bilinear(to_chw_float(rgb, 1 / 255), self.size, antialias=True)
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            path = self.path(index, task)
            raw = read_gray_uint8(path) if task == "semantic" else read_gray_uint16(path)
            if raw.shape != rgb.shape[:2]:
                raise ValueError(f"{str(path)!r} is {_hw(raw.shape)} but its image {str(image_path)!r} is "
                                 f"{_hw(rgb.shape)}; expected the same size")
            small = resize_nearest(torch.from_numpy(raw.astype(np.int64)), self.size)
            if task == "semantic":
                if raw.size and int(raw.max()) >= NUM_LABEL_IDS:
                    raise ValueError(f"{str(path)!r} holds label id {int(raw.max())}; expected ids "
                                     f"0..{NUM_LABEL_IDS - 1}")
                targets[task] = self._lut[small]
            elif task == "depth":
                d = small.unsqueeze(0).float()
                targets[task] = torch.where(d > 0, (d - 1.0) / 256.0, torch.full_like(d, float("nan")))
            else:
                targets[task] = torch.from_numpy(instance_offsets(small.numpy()))
        return x, targets


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]} (HxW)"


def list_frames(root: Path, split: str) -> list[Frame]:
    """Frames of ``leftImg8bit/<split>/<city>/``, cities and files sorted by name."""
    folder = root / "leftImg8bit" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} does not exist; expected the official Cityscapes layout "
                                "leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png with gtFine/ "
                                "and disparity/ beside it")
    frames = []
    for city in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        names = sorted(m.group(1) for n in os.listdir(folder / city) if (m := _FRAME_NAME.match(n)))
        frames.extend(Frame(split, city, n) for n in names)
    if not frames:
        raise ValueError(f"{str(folder)!r} holds no <city>/<city>_<seq>_<frame>_leftImg8bit.png file; expected "
                         "one city folder per city")
    return frames


def _check_complete(root: Path, frames: Sequence[Frame], tasks: Sequence[str]) -> None:
    listing: dict[Path, set[str]] = {}
    for f in frames:
        for task in tasks:
            path = frame_path(root, f, task)
            folder = path.parent
            if folder not in listing:
                listing[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listing[folder]:
                raise FileNotFoundError(f"{str(path)!r} is missing: frame {f.name!r} has an image in "
                                        f"leftImg8bit/{f.split} but no {_FILES[task][0]} file for task {task!r}")


@register_dataset("cityscapes")
def cityscapes(root: str | None = None, tasks: Sequence[str] = DEFAULT_TASKS, image_size: Sequence[int] = (128, 256),
               val_fraction: float = 0.1, seed: int = 0, max_per_split: int | None = None,
               semantic_classes: Literal[19, 7] = 19) -> TaskData:
    """Cityscapes tasks from the official files under ``root``; see the module docstring.

    Args:
        root: folder holding ``leftImg8bit/``, ``gtFine/`` and ``disparity/``.
        tasks: subset of ``semantic``, ``depth``, ``instance`` (default the first two, MTAN's).
        image_size: (height, width) of the input and targets (MTAN: 128 x 256).
        val_fraction: share of the official train frames held out (seeded) as validation; 0 = validate
            on the test split (the official val).
        seed: seed of that hold-out.
        max_per_split: keep the first ``n`` frames of train (before the hold-out) and of val.
        semantic_classes: 19 (train ids) or 7 (categories).
    """
    root_path = dataset_root(root, "cityscapes", "the Cityscapes folder with leftImg8bit/, gtFine/ and disparity/")
    tasks = task_list(tasks, CITYSCAPES_TASKS)
    if semantic_classes not in (19, 7) or isinstance(semantic_classes, bool):
        raise ValueError(f"data.semantic_classes must be 19 (train ids) or 7 (categories), got {semantic_classes!r}")
    task_objs = [cityscapes_task(t, semantic_classes) for t in tasks]
    if (not isinstance(image_size, (list, tuple)) or len(image_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)):
        raise ValueError(f"data.image_size must be [height, width] of positive integers, got {image_size!r}")
    size = (int(image_size[0]), int(image_size[1]))
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_per_split is not None and (not isinstance(max_per_split, int) or max_per_split < 1):
        raise ValueError(f"data.max_per_split must be a positive integer or null, got {max_per_split!r}")

    train_all, test_frames = list_frames(root_path, "train"), list_frames(root_path, "val")
    if max_per_split:
        train_all, test_frames = train_all[:max_per_split], test_frames[:max_per_split]
    _check_complete(root_path, train_all + test_frames, tasks)

    def subset(frames: Sequence[Frame]) -> CityscapesDataset:
        return CityscapesDataset(root_path, frames, tasks, size, semantic_classes)

    test = subset(test_frames)
    train, val = held_out_validation(train_all, test, float(val_fraction), seed, subset)
    info = {"root": str(root_path), "tasks": tasks, "image_size": list(size), "val_fraction": float(val_fraction),
            "seed": seed, "max_per_split": max_per_split, "semantic_classes": semantic_classes,
            "validation": "held-out part of the official train" if val_fraction > 0
            else "the test split (the official val, MTAN practice)",
            "split_sizes": {"train": len(train), "val": len(val), "test": len(test)}}
    return TaskData(name="cityscapes", tasks=task_objs, train=train, val=val, test=test,
                    input_shape=(3, *size), info=info)
