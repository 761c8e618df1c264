"""Taskonomy from its official PNG files, normalised as Standley et al., TAG and DMTG do.

Layouts (both accepted, decided per building)::

    root/<domain>/<building>/point_<P>_view_<V>_domain_<suffix>.png     (official)
    root/<building>/<domain>/point_<P>_view_<V>_domain_<suffix>.png

where ``suffix`` is the domain name except ``segmentsemantic`` for ``segment_semantic``. Paths
are built from (domain, building, point, view), never by string replacement over a path.

Targets, from the raw file values (Standley's ``taskonomy_loader.py``, reused by TAG and DMTG):

============== ============ ============================== ==========================================
domain         file         target                         task
============== ============ ============================== ==========================================
rgb (input)    8-bit RGB    x / 255                        --
segment_sem.   8-bit ids    id, with id 0 -> -1 (ignored)  segmentation, 18 classes, cross-entropy
depth_zbuffer  16-bit       (d - 1500) / 1000; NaN where   dense regression, L1
                            raw d >= 8192 (65535 = no hit)
normal         8-bit RGB    2 (x / 255 - 0.5)              normal (3 channels), L1
keypoints2d    16-bit       (k - 50) / 100                 dense regression, L1
edge_texture   16-bit       (e - 718) / 1070               dense regression, L1
edge_occlusion 16-bit       (e - 56.0248) / 239.1265       dense regression, L1
============== ============ ============================== ==========================================

As in Standley's loss code, ``normal`` and ``edge_occlusion`` are also masked (NaN) where the depth
is invalid (``mask_from_depth=True``, which then requires the depth files). 16-bit PNGs are read
as unsigned. When the files are not ``image_size`` square, maps are resized with antialiased
bilinear interpolation (what Pillow's BILINEAR resize, used by Standley and DMTG, does) before
normalising (the depth validity threshold is applied after resizing, as there); label ids are
resized with nearest neighbour so they stay ids (Standley's loader interpolated them too).

Images are read lazily, one view per item: a building holds thousands of 512x512 views.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskgrouping.data.base import TaskData
from taskgrouping.data.image_io import (read_gray_uint8, read_gray_uint16, read_rgb, resize_bilinear,
                                        resize_nearest, to_chw_float)
from taskgrouping.data.layout import dataset_root, task_list
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

#: The five tasks of Standley et al. (ICML 2020), TAG and DMTG ("sdnkt").
DEFAULT_TASKS: tuple[str, ...] = ("segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture")
SEGMENT_CLASSES = 18
#: Raw z-buffer values at or above this are invalid (2**13; 65535 marks "no surface").
DEPTH_INVALID_FROM = 8192
_DEPTH_MASKED = ("normal", "edge_occlusion")
_RGB_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.png$")
#: domain -> (offset, scale) of ``(raw - offset) / scale`` for the single-channel 16-bit maps.
_AFFINE_16BIT: dict[str, tuple[float, float]] = {
    "depth_zbuffer": (1500.0, 1000.0),
    "keypoints2d": (50.0, 100.0),
    "edge_texture": (718.0, 1070.0),
    "edge_occlusion": (56.0248, 239.1265),
}


def taskonomy_task(name: str) -> Task:
    """The :class:`Task` (kind, classes, channels, loss) of a Taskonomy domain."""
    if name == "segment_semantic":
        return Task(name, "segmentation", num_classes=SEGMENT_CLASSES)
    if name == "normal":
        return Task(name, "normal", out_channels=3, loss_type="l1")
    if name in _AFFINE_16BIT:
        return Task(name, "dense_regression", out_channels=1, loss_type="l1")
    raise ValueError(f"unknown Taskonomy task {name!r}; expected one of {supported_tasks()}")


def supported_tasks() -> list[str]:
    return ["segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture", "edge_occlusion"]


def file_name(domain: str, point: str, view: str) -> str:
    """``point_<P>_view_<V>_domain_<suffix>.png`` of one view in one domain."""
    suffix = "segmentsemantic" if domain == "segment_semantic" else domain
    return f"point_{point}_view_{view}_domain_{suffix}.png"


def read_building_list(value: str | os.PathLike | Sequence[str] | None, option: str) -> list[str]:
    """A list of building names, or the path of a text file with one building per line."""
    if value is None:
        raise ValueError(f"data.{option} is required for data.name=taskonomy: a list of buildings or a text "
                         "file with one building per line (e.g. DMTG's tiny_train_models.txt)")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.{option}: {str(path)!r} does not exist; expected a text file with "
                                    "one building per line, or a list of building names")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = f"{str(path)!r} (data.{option})"
    else:
        names = [str(b).strip() for b in value]
        where = f"data.{option}"
    if not names:
        raise ValueError(f"{where} names no building; expected at least one")
    if len(set(names)) != len(names):
        dup = next(b for b in names if names.count(b) > 1)
        raise ValueError(f"{where} lists building {dup!r} twice")
    return names


def building_dirs(root: Path, building: str, domains: Sequence[str]) -> dict[str, Path]:
    """Folder of each domain for ``building``, in whichever of the two layouts holds its RGB images."""
    if (root / "rgb" / building).is_dir():
        return {d: root / d / building for d in domains}
    if (root / building / "rgb").is_dir():
        return {d: root / building / d for d in domains}
    raise FileNotFoundError(f"building {building!r}: neither {str(root / 'rgb' / building)!r} nor "
                            f"{str(root / building / 'rgb')!r} exists; expected its RGB images in one of them")


@dataclass(frozen=True)
class View:
    """One (building, point, view) sample; point and view are kept as written in the file name."""

    building: str
    point: str
    view: str


class TaskonomyDataset(Dataset):
    """Views of some buildings; each item reads its PNGs and returns ``(rgb, {task: target})``.

    Targets are float32 (C, S, S) for regression tasks and int64 (S, S) for segmentation, following
    the masking convention of :mod:`taskgrouping.tasks` (NaN / -1 = no label).
    """

    def __init__(self, views: list[View], dirs: dict[str, dict[str, Path]], tasks: Sequence[str],
                 image_size: int, mask_from_depth: bool) -> None:
        self.views = views
        self.dirs = dirs
        self.tasks = list(tasks)
        self.image_size = image_size
        self.mask_from_depth = mask_from_depth

    def __len__(self) -> int:
        return len(self.views)

    def path(self, index: int, domain: str) -> Path:
        v = self.views[index]
        return self.dirs[v.building][domain] / file_name(domain, v.point, v.view)

    def _resize(self, t: Tensor) -> Tensor:
        return resize_bilinear(t, (self.image_size, self.image_size), antialias=True)

    def _raw_16bit(self, index: int, domain: str) -> Tensor:
        return self._resize(to_chw_float(read_gray_uint16(self.path(index, domain))))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = self._resize(to_chw_float(read_rgb(self.path(index, "rgb")), 1 / 255))
        needs_depth = "depth_zbuffer" in self.tasks or (
            self.mask_from_depth and any(t in _DEPTH_MASKED for t in self.tasks))
        depth_raw = invalid = None
        if needs_depth:
            depth_raw = self._raw_16bit(index, "depth_zbuffer")
            invalid = depth_raw >= DEPTH_INVALID_FROM
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            if task == "segment_semantic":
                targets[task] = self._segmentation(index)
                continue
            if task == "normal":
                y = self._resize(to_chw_float(read_rgb(self.path(index, task)), 1 / 255)).sub_(0.5).mul_(2.0)
            else:
                raw = depth_raw if task == "depth_zbuffer" else self._raw_16bit(index, task)
                offset, scale = _AFFINE_16BIT[task]
                y = (raw - offset) / scale
            if task == "depth_zbuffer" or (self.mask_from_depth and task in _DEPTH_MASKED):
                y = y.masked_fill(invalid.expand_as(y), float("nan"))
            targets[task] = y
        return x, targets

    def _segmentation(self, index: int) -> Tensor:
        path = self.path(index, "segment_semantic")
        ids = read_gray_uint8(path)
        if ids.size and int(ids.max()) >= SEGMENT_CLASSES:
            raise ValueError(f"{str(path)!r} holds class id {int(ids.max())}; expected ids 0..{SEGMENT_CLASSES - 1}")
        y = resize_nearest(torch.from_numpy(ids.astype(np.int64)), (self.image_size, self.image_size))
        return y.masked_fill_(y == 0, -1)


def _views_of(building: str, rgb_dir: Path, window: tuple[int, int] | None) -> list[View]:
    names = sorted(n for n in os.listdir(rgb_dir) if _RGB_NAME.match(n))
    if not names:
        raise ValueError(f"building {building!r}: no point_<P>_view_<V>_domain_rgb.png files in "
                         f"{str(rgb_dir)!r}")
    if window is not None:
        names = names[window[0]:window[1]]
    return [View(building, *_RGB_NAME.match(n).groups()) for n in names]


def _check_complete(views: list[View], dirs: dict[str, dict[str, Path]], domains: Sequence[str],
                    drop_incomplete: bool) -> tuple[list[View], int]:
    listing: dict[Path, set[str]] = {}
    kept, dropped = [], 0
    for v in views:
        complete = True
        for d in domains:
            folder = dirs[v.building][d]
            if folder not in listing:
                if not folder.is_dir():
                    if drop_incomplete:
                        listing[folder] = set()
                    else:
                        raise FileNotFoundError(f"building {v.building!r} has no {d!r} folder "
                                                f"({str(folder)!r}); expected one file per RGB view")
                else:
                    listing[folder] = set(os.listdir(folder))
            name = file_name(d, v.point, v.view)
            if name not in listing[folder]:
                if not drop_incomplete:
                    raise FileNotFoundError(f"{str(folder / name)!r} is missing: the view exists in rgb but not "
                                            f"for {d!r} (set data.drop_incomplete=true to skip such views)")
                complete = False
                break
        if complete:
            kept.append(v)
        else:
            dropped += 1
    return kept, dropped


def _window(value: Sequence[int] | None, option: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(i, int) and i >= 0 for i in value) or value[0] >= value[1]:
        raise ValueError(f"data.{option} must be [start, stop] with 0 <= start < stop, got {value!r}")
    return int(value[0]), int(value[1])


@register_dataset("taskonomy")
def taskonomy(root: str | None = None, tasks: Sequence[str] = DEFAULT_TASKS,
              train_buildings: str | Sequence[str] | None = None, val_buildings: str | Sequence[str] | None = None,
              test_buildings: str | Sequence[str] | None = None, image_size: int = 256,
              train_slice: Sequence[int] | None = None, val_slice: Sequence[int] | None = None,
              test_slice: Sequence[int] | None = None, mask_from_depth: bool = True,
              drop_incomplete: bool = False) -> TaskData:
    """Taskonomy tasks from the PNG files under ``root`` (see the module docstring).

    Args:
        root: Taskonomy folder (either layout).
        tasks: domains to predict; default the five of Standley, TAG and DMTG.
        train_buildings, val_buildings, test_buildings: building names or text files of them
            (``grouping-data/dmtg/splits/tiny_*_models.txt``, ``.../standley_taskgrouping/splits``).
        image_size: side of the square input and targets (256 in the papers).
        train_slice, val_slice, test_slice: ``[start, stop]`` of each building's views, sorted by
            file name (Standley validates on views 0-1000 and tests on 1000-2000 of the same buildings).
        mask_from_depth: mask ``normal`` / ``edge_occlusion`` where the depth is invalid (Standley).
        drop_incomplete: skip views lacking a file for some task instead of raising.
    """
    root_path = dataset_root(root, "taskonomy", "the Taskonomy folder with rgb/, depth_zbuffer/, ...")
    tasks = task_list(tasks, supported_tasks())
    task_objs = [taskonomy_task(t) for t in tasks]
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"data.image_size must be a positive integer, got {image_size!r}")
    domains = ["rgb", *tasks]
    if "depth_zbuffer" not in tasks and mask_from_depth and any(t in _DEPTH_MASKED for t in tasks):
        domains.append("depth_zbuffer")

    splits = {}
    info_buildings, dropped = {}, {}
    for split, value, window in (("train", train_buildings, train_slice), ("val", val_buildings, val_slice),
                                 ("test", test_buildings, test_slice)):
        buildings = read_building_list(value, f"{split}_buildings")
        win = _window(window, f"{split}_slice")
        dirs = {b: building_dirs(root_path, b, domains) for b in buildings}
        views = [v for b in buildings for v in _views_of(b, dirs[b]["rgb"], win)]
        views, dropped[split] = _check_complete(views, dirs, domains[1:], drop_incomplete)
        splits[split] = TaskonomyDataset(views, dirs, tasks, image_size, mask_from_depth)
        info_buildings[split] = buildings
    info = {"root": str(root_path), "tasks": tasks, "image_size": image_size, "buildings": info_buildings,
            "slices": {"train": train_slice, "val": val_slice, "test": test_slice},
            "mask_from_depth": mask_from_depth, "dropped_incomplete_views": dropped,
            "split_sizes": {s: len(d) for s, d in splits.items()}}
    return TaskData(name="taskonomy", tasks=task_objs, train=splits["train"], val=splits["val"],
                    test=splits["test"], input_shape=(3, image_size, image_size), info=info)
