"""NYUv2 in the preprocessed ``.npy`` layout of MTAN (Liu et al., CVPR 2019), 13-class version.

Layout::

    root/{train,val}/image/{i}.npy    float (H, W, 3) in [0, 1]
    root/{train,val}/label/{i}.npy    (H, W) class ids 0..12, -1 = unlabelled
    root/{train,val}/depth/{i}.npy    float (H, W, 1), 0 = no measurement
    root/{train,val}/normal/{i}.npy   float (H, W, 3) unit normals, all-zero = no measurement

with H x W = 288 x 384 and 795 / 654 images. Tasks and targets (the conventions of
:mod:`taskgrouping.tasks`):

* ``semantic``: segmentation, 13 classes, cross-entropy, -1 ignored (MTAN: ``ignore_index=-1``);
* ``depth``: dense regression, L1 over measured pixels (0 -> NaN), as MTAN's masked L1;
* ``normal``: 3 channels, ``loss_type="cosine"`` by default: 1 - cos(prediction, target) over
  pixels whose normal is not all zero (all-zero -> NaN). MTAN normalises the prediction and
  minimises 1 - <pred, target> over those pixels; with unit targets this is the same loss.
  ``normal_loss="l1"`` gives an L1 alternative.

MTAN ships only ``train`` and ``val`` and evaluates on ``val``. Here ``val`` is the **test** split,
and a seeded ``val_fraction`` of ``train`` is held out as validation (for early stopping and
grouping decisions that must not see the test images). ``val_fraction=0`` reproduces MTAN's own
practice: validation = test.

Files are loaded per item with ``np.load(allow_pickle=False)``; every file's shape is checked
from its header when the dataset is built, so a wrong file fails at once, by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskgrouping.data.base import TaskData, split_indices
from taskgrouping.data.image_io import load_npy, npy_header
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

NYU_CLASSES = 13
NYU_TASKS: tuple[str, ...] = ("semantic", "depth", "normal")
#: task -> folder of its target files
_FOLDER = {"semantic": "label", "depth": "depth", "normal": "normal"}
_INDEX_NAME = re.compile(r"^(\d+)\.npy$")


def nyuv2_task(name: str, normal_loss: str = "cosine") -> Task:
    """The :class:`Task` of an NYUv2 task name."""
    if name == "semantic":
        return Task(name, "segmentation", num_classes=NYU_CLASSES)
    if name == "depth":
        return Task(name, "dense_regression", out_channels=1, loss_type="l1")
    if name == "normal":
        return Task(name, "normal", out_channels=3, loss_type=normal_loss)
    raise ValueError(f"unknown NYUv2 task {name!r}; expected one of {list(NYU_TASKS)}")


def _expected_shape(folder: str, h: int, w: int) -> tuple[int, ...]:
    return {"image": (h, w, 3), "label": (h, w), "depth": (h, w, 1), "normal": (h, w, 3)}[folder]


def _check_array(path: Path, folder: str, shape: tuple[int, ...], dtype: np.dtype, size: tuple[int, int]) -> None:
    expected = _expected_shape(folder, *size)
    if shape != expected:
        raise ValueError(f"{str(path)!r} has shape {shape}; expected {expected}")
    if folder == "label":
        if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.signedinteger)):
            raise ValueError(f"{str(path)!r} has dtype {dtype}; expected signed integers or floats (-1 = ignore)")
    elif not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{str(path)!r} has dtype {dtype}; expected floats")


class NYUv2Dataset(Dataset):
    """Some images of one MTAN split folder; yields ``(image, {task: target})`` read on access."""

    def __init__(self, folder: Path, indices: Sequence[int], tasks: Sequence[str], size: tuple[int, int]) -> None:
        self.folder = folder
        self.indices = list(indices)
        self.tasks = list(tasks)
        self.size = size

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, index: int, folder: str) -> Path:
        return self.folder / folder / f"{self.indices[index]}.npy"

    def _array(self, index: int, folder: str) -> np.ndarray:
        path = self.path(index, folder)
        a = load_npy(path)
        _check_array(path, folder, a.shape, a.dtype, self.size)
        return a

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = torch.from_numpy(self._array(index, "image").astype(np.float32)).permute(2, 0, 1).contiguous()
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            a = self._array(index, _FOLDER[task])
            if task == "semantic":
                targets[task] = self._labels(a, self.path(index, "label"))
            elif task == "depth":
                d = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1).contiguous()
                targets[task] = d.masked_fill_(d == 0, float("nan"))
            else:
                n = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1).contiguous()
                targets[task] = n.masked_fill_((n == 0).all(dim=0, keepdim=True).expand_as(n), float("nan"))
        return x, targets

    @staticmethod
    def _labels(a: np.ndarray, path: Path) -> Tensor:
        ids = np.rint(a)
        bad = (ids != a) | (ids < -1) | (ids >= NYU_CLASSES)
        if bad.any():
            raise ValueError(f"{str(path)!r} holds label {a[bad].flat[0].item():g}; "
                             f"expected integers -1..{NYU_CLASSES - 1}")
        return torch.from_numpy(ids.astype(np.int64))


def _indices(folder: Path) -> list[int]:
    image_dir = folder / "image"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{str(image_dir)!r} does not exist; expected MTAN's NYUv2 layout "
                                "root/{train,val}/{image,label,depth,normal}/{i}.npy")
    found = sorted(int(m.group(1)) for n in os.listdir(image_dir) if (m := _INDEX_NAME.match(n)))
    if not found:
        raise ValueError(f"{str(image_dir)!r} holds no {{i}}.npy files; expected one per image")
    return found


def _validate(folder: Path, indices: Sequence[int], folders: Sequence[str], size: tuple[int, int]) -> None:
    for sub in folders:
        for i in indices:
            path = folder / sub / f"{i}.npy"
            shape, dtype = npy_header(path)
            _check_array(path, sub, shape, dtype, size)


@register_dataset("nyuv2")
def nyuv2(root: str | None = None, tasks: Sequence[str] = NYU_TASKS, val_fraction: float = 0.1, seed: int = 0,
          image_size: Sequence[int] = (288, 384), normal_loss: str = "cosine") -> TaskData:
    """NYUv2 (MTAN layout) from ``root``; see the module docstring for splits and targets.

    Args:
        root: folder holding ``train/`` and ``val/``.
        tasks: subset of ``semantic``, ``depth``, ``normal``.
        val_fraction: share of ``train`` held out (seeded) as validation; 0 = validate on the test split.
        seed: seed of that hold-out.
        image_size: (height, width) every file must have (not resized).
        normal_loss: ``"cosine"`` (MTAN) or ``"l1"``.
    """
    if not root:
        raise ValueError("data.root is required for data.name=nyuv2 (the folder with train/ and val/)")
    root_path = Path(root).expanduser()
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("data.tasks is empty; expected some of ['semantic', 'depth', 'normal']")
    task_objs = [nyuv2_task(t, normal_loss) for t in tasks]
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(f"data.image_size must be [height, width] of positive integers, got {image_size!r}")
    size = (int(image_size[0]), int(image_size[1]))
    folders = ["image", *(_FOLDER[t] for t in tasks)]

    train_dir, test_dir = root_path / "train", root_path / "val"
    train_all, test_idx = _indices(train_dir), _indices(test_dir)
    _validate(train_dir, train_all, folders, size)
    _validate(test_dir, test_idx, folders, size)
    test = NYUv2Dataset(test_dir, test_idx, tasks, size)
    if val_fraction > 0:
        keep, held = split_indices(len(train_all), (1.0 - float(val_fraction), float(val_fraction)), seed)
        train = NYUv2Dataset(train_dir, [train_all[i] for i in sorted(keep.tolist())], tasks, size)
        val = NYUv2Dataset(train_dir, [train_all[i] for i in sorted(held.tolist())], tasks, size)
    else:
        train = NYUv2Dataset(train_dir, train_all, tasks, size)
        val = test
    info = {"root": str(root_path), "tasks": tasks, "image_size": list(size), "val_fraction": float(val_fraction),
            "seed": seed, "normal_loss": normal_loss,
            "validation": "held-out part of train" if val_fraction > 0 else "the test split (MTAN practice)",
            "split_sizes": {"train": len(train), "val": len(val), "test": len(test)}}
    return TaskData(name="nyuv2", tasks=task_objs, train=train, val=val, test=test,
                    input_shape=(3, *size), info=info)
