"""What every loader of files in an official layout checks first, and how the ones without a
validation split hold one out: one wording for the same mistakes across datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from taskgrouping.data.base import split_indices

__all__ = ["dataset_root", "held_out_validation", "task_list"]

D = TypeVar("D")


def dataset_root(root: object, name: str, expected: str) -> Path:
    """``data.root`` as a path to an existing folder, else one line naming ``expected`` (its contents)."""
    if not root:
        raise ValueError(f"data.root is required for data.name={name} ({expected})")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.root {str(path)!r} is not a directory; expected {expected}")
    return path


def task_list(tasks: str | Iterable[str], known: Sequence[str]) -> list[str]:
    """``data.tasks`` as a non-empty list without repeats (one name may be given as a string)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"data.tasks is empty; expected some of {list(known)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"data.tasks repeats a task: {tasks}")
    return tasks


def held_out_validation(train_all: Sequence, test: D, val_fraction: float, seed: int,
                        subset: Callable[[list], D]) -> tuple[D, D]:
    """(train, val) for a dataset whose official validation split is the test split: a seeded
    ``val_fraction`` of the official training items held out (order kept); 0 validates on ``test``."""
    if val_fraction <= 0:
        return subset(list(train_all)), test
    keep, held = split_indices(len(train_all), (1.0 - float(val_fraction), float(val_fraction)), seed)
    return subset([train_all[i] for i in sorted(keep.tolist())]), subset([train_all[i] for i in sorted(held.tolist())])
