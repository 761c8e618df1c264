"""Users' own tensors in one NumPy ``.npz`` file (``data.name=npz``, ``data.path=FILE``).

Required arrays: ``x_train``, ``y_train``, ``x_val``, ``y_val``, ``x_test``, ``y_test`` (inputs of any
shape; ``y`` as samples x tasks, NaN = missing label), ``task_names`` (strings) and ``task_types``
(``binary`` | ``regression`` per task). Binary labels must be 0/1 (or NaN).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.checks import check_allocation, format_bytes
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

REQUIRED = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "task_names", "task_types")
NPZ_TASK_TYPES = ("binary", "regression")


def _read_header(fh: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def check_headers(file: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every ``.npy`` array of ``file``, read from the headers alone and
    checked before anything is allocated: no pickled objects, inputs and labels numeric, every array
    no larger than the file holds, all of them together within the memory available."""
    declared: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    sizes: dict[str, int] = {}
    try:
        with zipfile.ZipFile(file) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with zf.open(info) as fh:
                    shape, dtype = _read_header(fh)
                    header = fh.tell()
                declared[name] = (shape, dtype)
                sizes[name] = math.prod(shape) * dtype.itemsize
                if dtype.hasobject:
                    raise ValueError(f"{file}: array {name!r} holds pickled Python objects (dtype {dtype}); "
                                     "expected plain numeric or string arrays")
                if sizes[name] > info.file_size - header:
                    raise ValueError(f"{file}: array {name!r} declares shape {shape} of {dtype} "
                                     f"({format_bytes(sizes[name])}) but the file holds "
                                     f"{format_bytes(max(info.file_size - header, 0))} for it; expected an intact "
                                     ".npz file")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        text = str(exc)
        raise ValueError(text if text.startswith(str(file)) else
                         f"{file}: not a readable .npz file without pickled objects ({exc})") from None
    for split in ("train", "val", "test"):
        for kind, what in (("x", "inputs"), ("y", "labels")):
            entry = declared.get(f"{kind}_{split}")
            numeric = np.issubdtype(entry[1], np.integer) or np.issubdtype(entry[1], np.floating) if entry else True
            if not numeric and not (kind == "y" and entry[1] == np.bool_):
                raise ValueError(f"{file}: {kind}_{split} has dtype {entry[1]} ({_dtype_words(entry[1])}); "
                                 f"expected numeric {what}" + (" (0/1 for binary tasks, NaN = missing)"
                                                                if kind == "y" else ""))
    # loaded arrays, then a float copy of each (at most 8 bytes per element)
    need = sum(sizes[k] + 8 * math.prod(declared[k][0]) for k in declared)
    if declared:
        big = max(sizes, key=sizes.get)
        check_allocation(f"{file}: loading its arrays (the largest, {big!r}, declares shape {declared[big][0]} "
                         f"of {declared[big][1]}, {format_bytes(sizes[big])})", need)
    return declared


def _dtype_words(dtype: np.dtype) -> str:
    return {"U": "strings", "S": "bytes", "c": "complex numbers", "M": "dates", "m": "time spans",
            "V": "raw records"}.get(dtype.kind, f"kind {dtype.kind!r}")


@register_dataset("npz")
def npz(path: str | None = None) -> TaskData:
    """Load a user's multi-task dataset from ``path`` (see the module docstring for the layout)."""
    if not path:
        raise ValueError("data.path is required for data.name=npz (a .npz file with x_train, y_train, ...)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.path {str(file)!r} does not exist; expected a .npz file")
    declared = check_headers(file)
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in declared}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{file}: not a readable .npz file without pickled objects ({exc})") from None
    except MemoryError:
        raise ValueError(f"{file}: its arrays do not fit in the memory available") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{file}: missing array(s) {missing}; expected {list(REQUIRED)}")
    names = [str(s) for s in np.asarray(arrays["task_names"]).reshape(-1)]
    types = [str(s) for s in np.asarray(arrays["task_types"]).reshape(-1)]
    if len(names) != len(types):
        raise ValueError(f"{file}: {len(names)} task_names but {len(types)} task_types; expected one type per task")
    if len(set(names)) != len(names):
        raise ValueError(f"{file}: task_names repeat: {names}")
    for n, t in zip(names, types):
        if t not in NPZ_TASK_TYPES:
            raise ValueError(f"{file}: task {n!r} has type {t!r}; expected one of {NPZ_TASK_TYPES}")
    splits, input_shape = [], None
    for split in ("train", "val", "test"):
        x = np.asarray(arrays[f"x_{split}"])
        y = np.asarray(arrays[f"y_{split}"])
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{file}: x_{split} has dtype {x.dtype}; expected numbers")
        if x.ndim < 2:
            raise ValueError(f"{file}: x_{split} has shape {x.shape}; expected (samples, features...)")
        if x.shape[0] == 0:
            raise ValueError(f"{file}: the {split} split is empty (x_{split} has 0 samples)")
        if input_shape is None:
            input_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != input_shape:
            raise ValueError(f"{file}: x_{split} inputs have shape {x.shape[1:]}, x_train's have {input_shape}")
        if y.ndim == 1 and len(names) == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape != (x.shape[0], len(names)):
            raise ValueError(f"{file}: y_{split} has shape {y.shape}; expected (samples, tasks) = "
                             f"({x.shape[0]}, {len(names)})")
        y = y.astype(np.float64)
        targets = {}
        for j, (n, t) in enumerate(zip(names, types)):
            col = y[:, j]
            if t == "binary":
                bad = ~np.isnan(col) & ~np.isin(col, (0.0, 1.0))
                if bad.any():
                    raise ValueError(f"{file}: task {n!r} (binary) has label {float(col[bad][0])!r} in y_{split}; "
                                     "expected 0, 1 or NaN")
                targets[n] = torch.from_numpy(np.where(np.isnan(col), -1, col).astype(np.int64))
            else:
                if np.isinf(col).any():
                    raise ValueError(f"{file}: task {n!r} has an infinite label in y_{split}")
                targets[n] = torch.from_numpy(col.astype(np.float32)[:, None])
        splits.append(TensorTaskDataset(torch.from_numpy(x.astype(np.float32)), targets))
    try:
        tasks = [Task(n, "binary" if t == "binary" else "regression") for n, t in zip(names, types)]
        return TaskData("npz", tasks, *splits, input_shape=input_shape, groups=None, info={"path": str(file)})
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None
