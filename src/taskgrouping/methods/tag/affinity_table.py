"""TAG's inter-task affinity tables (Fifty et al., NeurIPS 2021): reading the authors' JSON files and
normalising the accepted forms.

Orientation convention used throughout the package: an affinity **matrix** ``A`` is indexed
``A[source, recipient]`` (row = the task whose gradient took the step). The JSON files of the TAG
authors (``{recipient: {source: value}}``) are the transpose; :func:`load_affinity` and
:func:`to_file_form` convert between the two.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor

from taskgrouping.readers import read_json

__all__ = ["AffinityLike", "load_affinity", "as_matrix", "to_file_form"]

AffinityLike = Mapping[str, Mapping[str, float]] | np.ndarray | Tensor | Sequence[Sequence[float]]

_FILE_FORM = "a JSON object {recipient: {source: affinity}} over one set of tasks"


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
        return False


def _check_nested(obj: Any, where: str) -> tuple[list[str], np.ndarray]:
    """Validate ``{recipient: {source: value}}`` and return (names, A[source, recipient])."""
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where}: expected a non-empty JSON object {{recipient: {{source: value}}}}, "
                         f"got {type(obj).__name__}")
    names = [str(k) for k in obj]
    first_sources: list[str] | None = None
    n = len(names)
    mat = np.empty((n, n), dtype=np.float64)
    for r, recipient in enumerate(names):
        row = obj[recipient]
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: the entry of task {recipient!r} must be an object {{source: value}}, "
                             f"got {type(row).__name__}")
        sources = [str(s) for s in row]
        if first_sources is None:
            first_sources = sources
        if set(sources) != set(first_sources):
            missing = sorted(set(first_sources) - set(sources))
            extra = sorted(set(sources) - set(first_sources))
            raise ValueError(f"{where}: task {recipient!r} has a different source set than {names[0]!r} "
                             f"(missing {missing}, extra {extra}); every recipient needs the same sources")
        if set(sources) != set(names):
            missing = sorted(set(names) - set(sources))
            extra = sorted(set(sources) - set(names))
            raise ValueError(f"{where}: matrix is not square over the same tasks: task {recipient!r} lists "
                             f"sources {sources}; missing {missing}, unknown {extra}")
        for s, source in enumerate(names):
            value = row[source]
            if not _finite(value):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise ValueError(f"{where}: affinity of {source!r} onto {recipient!r} must be a finite number, "
                                 f"got {shown}")
            mat[s, r] = float(value)
    return names, mat


def load_affinity(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a TAG affinity JSON file ``{recipient: {source: value}}``.

    Returns ``(task_names, A)`` with ``A[source, recipient]`` (the module's convention), tasks in
    the file's order. Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the
    offending task when the file is not a square table of numbers over one task set (also for a
    directory, a binary or oversized file, invalid or deeply nested JSON and repeated keys).
    """
    path = Path(path)
    return _check_nested(read_json(path, _FILE_FORM, max_depth=8), str(path))


def as_matrix(affinity: AffinityLike, tasks: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """Normalise the accepted affinity forms to (tasks, A[source, recipient]) restricted to ``tasks``."""
    if isinstance(affinity, Mapping):
        names, mat = _check_nested(affinity, "affinity")
        if tasks is None:
            return names, mat
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in the affinity matrix, which names {names}")
        idx = [names.index(t) for t in tasks]
        return list(tasks), mat[np.ix_(idx, idx)]
    mat = affinity.detach().cpu().double().numpy() if isinstance(affinity, Tensor) else np.asarray(affinity, float)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"affinity matrix must be square [N, N], got shape {tuple(mat.shape)}")
    if tasks is None:
        raise ValueError("an affinity given as a matrix needs `tasks` (the names of its rows/columns)")
    if len(tasks) != mat.shape[0]:
        raise ValueError(f"affinity matrix is {mat.shape[0]}x{mat.shape[0]} but {len(tasks)} task names were given")
    if not np.all(np.isfinite(mat)):
        raise ValueError("affinity matrix contains non-finite values")
    return list(tasks), mat


def to_file_form(matrix: Tensor | np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``A[source, recipient]`` -> TAG's file form ``{recipient: {source: value}}``."""
    return {r: {s: float(matrix[i, j]) for i, s in enumerate(names)} for j, r in enumerate(names)}
