"""Data sanity, checked once the data is loaded and before anything is written or trained.

:func:`validate_data` refuses what would otherwise fail (or silently mislead) during or after
training, each with one line naming the dataset (or the user's file), the split and the task:

* an empty split;
* inputs that are not finite (NaN or infinity in ``x``) or whose shape differs from the data's
  ``input_shape``;
* a task without targets in a split, or without a single label in it (every label missing): a task
  with no validation label cannot select an epoch, one with no test label has no score;
* labels a task cannot use: classification ids outside ``-1 .. num_classes - 1``, infinite
  regression targets.

Only tensors already in memory are scanned, in bounded chunks (no copy of a whole split); a lazy
dataset (images read on access) gets the size check only.

:func:`available_memory` and :func:`check_allocation` bound what a loader is about to allocate
(a generator's sizes, the shapes an ``.npz`` header declares) against the memory there is.
"""

from __future__ import annotations

import os
import torch
from torch import Tensor

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.tasks import Task

__all__ = ["validate_data", "sample_count", "available_memory", "check_allocation", "format_bytes"]

SPLITS = ("train", "val", "test")
#: Elements scanned at a time (bounds the temporaries of the finiteness and label checks).
CHUNK_ELEMENTS = 1 << 22
#: Assumed when the memory available cannot be read (not Linux).
FALLBACK_MEMORY = 16 * 2**30


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def available_memory() -> int:
    """Bytes of memory this process can still allocate: ``MemAvailable`` of ``/proc/meminfo``,
    capped by a cgroup (v2) limit; :data:`FALLBACK_MEMORY` where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            room = max(int(limit) - used, 0)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = FALLBACK_MEMORY
    return int(avail)


def check_allocation(what: str, n_bytes: int) -> None:
    """Raise ``ValueError`` naming ``what`` when ``n_bytes`` exceed the memory available."""
    avail = available_memory()
    if n_bytes > avail:
        raise ValueError(f"{what} needs about {format_bytes(n_bytes)} of memory, more than the "
                         f"{format_bytes(avail)} available; expected smaller sizes")


def _where(data: TaskData) -> str:
    path = data.info.get("path") if isinstance(data.info, dict) else None
    return str(path) if path else f"dataset {data.name!r}"


def _rows(t: Tensor):
    """``t`` in chunks of whole samples, each of at most about :data:`CHUNK_ELEMENTS` elements."""
    per_row = max(1, t[0].numel()) if t.shape[0] else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, t.shape[0], step):
        yield start, t[start:start + step]


def _check_inputs(where: str, split: str, x: Tensor, input_shape: tuple[int, ...]) -> None:
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{where}: the {split} inputs have shape {tuple(x.shape[1:])}; expected the data's input "
                         f"shape {tuple(input_shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        return
    for start, chunk in _rows(x):
        bad = ~torch.isfinite(chunk).reshape(chunk.shape[0], -1).all(dim=1)
        if bool(bad.any()):
            i = start + int(bad.nonzero()[0, 0])
            kind = "NaN" if bool(torch.isnan(x[i]).any()) else "an infinite value"
            raise ValueError(f"{where}: the {split} inputs (x) hold {kind} at sample {i}; expected finite numbers "
                             "(remove or impute those samples)")


def _count_labels(where: str, split: str, task: Task, y: Tensor) -> int:
    """Labelled entries of ``y``; bad labels are a ``ValueError``."""
    count = 0
    for _, chunk in _rows(y):
        if task.is_classification:
            if chunk.is_floating_point() and bool((chunk != chunk.round()).any()):
                raise ValueError(f"{where}: task {task.name!r} has a non-integer label in the {split} split; "
                                 f"expected class ids 0..{task.num_classes - 1} (-1 = missing)")
            bad = (chunk < -1) | (chunk >= task.num_classes)
            if bool(bad.any()):
                raise ValueError(f"{where}: task {task.name!r} has label {chunk[bad].flatten()[0].item():g} in the "
                                 f"{split} split; expected class ids 0..{task.num_classes - 1} (-1 = missing)")
            count += int((chunk >= 0).sum())
        elif chunk.is_floating_point():
            if bool(torch.isinf(chunk).any()):
                raise ValueError(f"{where}: task {task.name!r} has an infinite target in the {split} split; "
                                 "expected finite numbers (NaN = missing)")
            count += int((~torch.isnan(chunk)).sum())
        else:
            count += chunk.numel()
    return count


def sample_count(ds: object, what: str) -> int:
    """``len(ds)``, or a ``ValueError`` line naming ``what`` when it has no length or no sample."""
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} has no length; expected a sized dataset") from None
    if n == 0:
        raise ValueError(f"{what} is empty; expected at least one sample")
    return n


def validate_data(data: TaskData) -> None:
    """Raise ``ValueError`` (one line naming the dataset or file, the split and the task) when
    ``data`` cannot be trained and scored; see the module docstring for what is checked."""
    where = _where(data)
    for split in SPLITS:
        ds = getattr(data, split)
        sample_count(ds, f"{where}: the {split} split")
        if not isinstance(ds, TensorTaskDataset):
            continue  # lazy: read on access; scanning would read the whole dataset
        _check_inputs(where, split, ds.x, data.input_shape)
        for task in data.tasks:
            y = ds.targets.get(task.name)
            if y is None:
                raise ValueError(f"{where}: task {task.name!r} has no targets in the {split} split; expected one "
                                 "target per sample for every task")
            if _count_labels(where, split, task, y) == 0:
                raise ValueError(f"{where}: task {task.name!r} has no label in the {split} split (every label is "
                                 "missing); expected at least one, or drop the task")

