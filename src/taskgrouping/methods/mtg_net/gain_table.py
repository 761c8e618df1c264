"""The MTG-Net authors' measured gains (``grouping-data/mtg_net/collected_gain``) as a
:class:`GainTable`: the per-task gain of each trained task combination (the paper's relative
performance gain of a task trained in the combination over the task trained alone; 0 for a task
alone). A table answers gains instead of training networks ("oracle mode") and scores a grouping
(:func:`grouping_gain`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.mtg_net.masks import mask_code
from taskgrouping.readers import read_text

__all__ = ["GainTable", "MTGNET_FILES", "MTGNET_TASKS", "grouping_gain", "load_mtgnet_gains"]

#: Task names of the three MTG-Net gain collections, in column order.
MTGNET_TASKS: dict[str, list[str]] = {
    # gain_collection/taskonomy/train_taskonomy.py: segmentation, depth, normals, keypoints, occlusion edges
    "taskonomy": ["s", "d", "n", "k", "e"],
    # the ETTm1 CSV's variable columns (date excluded), the order Autoformer reads them in
    "ETTm1": ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"],
    # gain_collection/mimic/27_pairwise_sample.py
    "mimic27": ["icd_infection", "icd_neoplasms", "icd_endocrine", "icd_blood", "icd_mental", "icd_nervous",
                "icd_circulatory", "icd_respiratory", "icd_digestive", "icd_genitourinary", "icd_pregnancy",
                "icd_skin", "icd_musculoskeletal", "icd_congenital", "icd_ill_defined", "icd_injury",
                "disch_24h", "disch_48h", "mort_24h", "mort_48h", "Long LOS", "Readmission 30",
                "Final Acuity Outcome", "dnr_24h", "dnr_48h", "cmo_24h", "cmo_48h"],
}

#: (dataset, kind) -> (mask file, gain file) inside ``collected_gain/``.
MTGNET_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "taskonomy": {
        "measured": ("taskonomy/taskonomy_x.csv", "taskonomy/taskonomy.csv"),
        "hoa": ("taskonomy/taskonomy_x.csv", "taskonomy/taskonomy_HOA.csv"),
        "taghoa": ("taskonomy/taskonomy_x.csv", "taskonomy/taskonomy_TAGHOA.csv"),
    },
    "ETTm1": {
        "valid": ("ETT/ETTm1_x.csv", "ETT/ETTm1_val_y.csv"),
        "test": ("ETT/ETTm1_x.csv", "ETT/ETTm1_y.csv"),
        "hoa": ("ETT/ETTm1_x.csv", "ETT/ETTm1_HOA.csv"),
        "taghoa": ("ETT/ETTm1_x.csv", "ETT/ETTm1_TAG_HOA.csv"),
    },
    "mimic27": {
        "valid": ("mimic27/mimic_x.csv", "mimic27/mimic_y_valid.csv"),
        "test": ("mimic27/mimic_x.csv", "mimic27/mimic_y_test.csv"),
        "hoa": ("mimic27/mimic_x.csv", "mimic27/mimic_HOA.csv"),
        "taghoa": ("mimic27/mimic_x.csv", "mimic27/mimic_TAGHOA.csv"),
    },
}


#: Most task columns a table may have (a combination is coded as the bits of one integer).
_MAX_COLUMNS = 62


def _read_numeric_table(path: Path) -> np.ndarray:
    """Rows of numbers separated by commas and/or whitespace, no header; errors name file and line."""
    expected = "a table of numbers (comma or whitespace separated, one row per task combination, no header)"
    rows: list[list[float]] = []
    for lineno, line in enumerate(read_text(path, expected).splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected numbers only (no header), got {line.strip()[:80]!r}") from None
        if len(values) > _MAX_COLUMNS:
            raise ValueError(f"{path}:{lineno}: {len(values)} columns; at most {_MAX_COLUMNS} tasks are supported")
        if rows and len(values) != len(rows[0]):
            raise ValueError(f"{path}:{lineno}: {len(values)} columns, but the first row has {len(rows[0])}")
        rows.append(values)
    if not rows:
        raise ValueError(f"{path}: the file holds no rows; expected {expected}")
    return np.asarray(rows, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class GainTable:
    """Per-task gains of a set of task combinations.

    Attributes:
        tasks: task names (columns).
        masks: ``bool[M, N]``, row ``m`` = the tasks trained together in combination ``m``.
        gains: ``float[M, N]``, the gain of each member task in that combination (0 elsewhere).
        source: where the numbers came from (for error messages and provenance).

    Calling the table with a combination (iterable of task names) returns ``{task: gain}``; this is
    the "oracle" that stands in for training a network on that combination.
    """

    tasks: tuple[str, ...]
    masks: np.ndarray
    gains: np.ndarray
    source: str = "<memory>"
    _index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tasks = tuple(str(t) for t in self.tasks)
        object.__setattr__(self, "tasks", tasks)
        masks = np.asarray(self.masks)
        gains = np.asarray(self.gains, dtype=np.float64)
        where = self.source
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{where}: task names must be unique, got {list(tasks)}")
        if masks.ndim != 2 or gains.ndim != 2:
            raise ValueError(f"{where}: masks and gains must be 2-D [combinations, tasks], "
                             f"got shapes {masks.shape} and {gains.shape}")
        if masks.shape != gains.shape:
            raise ValueError(f"{where}: mask table has shape {masks.shape} but gain table {gains.shape}; "
                             f"expected one gain row per mask row and one column per task")
        if masks.shape[1] != len(tasks):
            raise ValueError(f"{where}: tables have {masks.shape[1]} columns but {len(tasks)} task names were given")
        if masks.shape[1] > _MAX_COLUMNS:
            raise ValueError(f"{where}: at most {_MAX_COLUMNS} tasks are supported, got {masks.shape[1]}")
        if not np.isin(masks, (0, 1)).all():
            r, c = np.argwhere(~np.isin(masks, (0, 1)))[0]
            raise ValueError(f"{where}: mask row {r}, task {tasks[c]!r} is {masks[r, c]}; masks must be 0/1")
        masks = masks.astype(bool)
        empty = np.flatnonzero(~masks.any(axis=1))
        if len(empty):
            raise ValueError(f"{where}: mask row {int(empty[0])} selects no task")
        if not np.isfinite(gains).all():
            r, c = np.argwhere(~np.isfinite(gains))[0]
            raise ValueError(f"{where}: gain row {r}, task {tasks[c]!r} is not finite")
        outside = np.argwhere(~masks & (gains != 0))
        if len(outside):
            r, c = outside[0]
            raise ValueError(f"{where}: row {r} gives task {tasks[c]!r} a gain of {gains[r, c]} although the "
                             f"task is not in that combination; gains must be 0 outside the mask")
        index: dict[int, int] = {}
        for r, row in enumerate(masks):
            b = mask_code(row)
            if b in index:
                raise ValueError(f"{where}: rows {index[b]} and {r} are the same combination "
                                 f"{[t for t, m in zip(tasks, row) if m]}")
            index[b] = r
        masks.setflags(write=False)
        gains = gains + 0.0  # turns -0.0 into 0.0
        gains.setflags(write=False)
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "gains", gains)
        object.__setattr__(self, "_index", index)

    @classmethod
    def load(cls, mask_path: str | Path, gain_path: str | Path, tasks: Sequence[str] | None = None) -> "GainTable":
        """Read a 0/1 mask file and a gain file (same rows; comma or whitespace separated, no header).

        ``tasks`` names the columns (default ``t0, t1, ...``).
        """
        mask_path, gain_path = Path(mask_path), Path(gain_path)
        masks = _read_numeric_table(mask_path)
        gains = _read_numeric_table(gain_path)
        if masks.shape[0] != gains.shape[0]:
            raise ValueError(f"{gain_path}: {gains.shape[0]} rows, but the mask file {mask_path} has {masks.shape[0]}")
        if masks.shape[1] != gains.shape[1]:
            raise ValueError(f"{gain_path}: {gains.shape[1]} columns, but the mask file {mask_path} has {masks.shape[1]}")
        if tasks is None:
            tasks = [f"t{i}" for i in range(masks.shape[1])]
        elif len(tasks) != masks.shape[1]:
            raise ValueError(f"{mask_path}: {masks.shape[1]} task columns but {len(tasks)} task names were given")
        return cls(tuple(tasks), masks, gains, source=f"{gain_path} (masks {mask_path})")

    # -- queries ------------------------------------------------------------------------------

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def __len__(self) -> int:
        return self.masks.shape[0]

    def mask_of(self, combo: Iterable[str]) -> np.ndarray:
        names = list(combo)
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise ValueError(f"{self.source}: unknown tasks {unknown}; the table has {list(self.tasks)}")
        mask = np.zeros(self.n_tasks, dtype=bool)
        mask[[self.tasks.index(t) for t in names]] = True
        return mask

    def row(self, mask: np.ndarray) -> int | None:
        """Row index of a combination given as a bool mask, or ``None`` when it was not measured."""
        return self._index.get(mask_code(np.asarray(mask, dtype=bool)))

    def __contains__(self, combo: Iterable[str]) -> bool:
        return self.row(self.mask_of(combo)) is not None

    def gains_of_masks(self, masks: np.ndarray) -> np.ndarray:
        """Per-task gains ``[B, N]`` of combinations given as bool masks; singletons are 0 even when
        absent from the table; any other unmeasured combination is an error."""
        out = np.zeros((len(masks), self.n_tasks))
        for b, mask in enumerate(np.asarray(masks, dtype=bool)):
            r = self.row(mask)
            if r is not None:
                out[b] = self.gains[r]
            elif mask.sum() != 1:
                raise ValueError(f"{self.source}: combination {[t for t, m in zip(self.tasks, mask) if m]} "
                                 f"was not measured")
        return out

    def __call__(self, combo: Iterable[str]) -> dict[str, float]:
        """Measured gain of every task of ``combo`` (the oracle answer)."""
        mask = self.mask_of(combo)
        g = self.gains_of_masks(mask[None])[0]
        return {t: float(g[i]) for i, t in enumerate(self.tasks) if mask[i]}

    def total(self, combo: Iterable[str]) -> float:
        return float(sum(self(combo).values()))


def load_mtgnet_gains(root: str | Path, dataset: str, kind: str = "measured") -> GainTable:
    """Load one of the MTG-Net gain collections from ``root`` (the ``collected_gain`` folder).

    ``dataset``: ``"taskonomy"`` (5 tasks, all 31 combinations), ``"ETTm1"`` (7 tasks, all 127),
    ``"mimic27"`` (27 tasks, 3,185 sampled combinations). ``kind``: ``"measured"`` (Taskonomy's only
    measurement; for ETTm1/MIMIC an alias of ``"valid"``), ``"valid"``, ``"test"``, ``"hoa"`` (HOA
    estimates: pair rows from pair trainings, larger rows averaged from pairs), ``"taghoa"``.
    """
    if dataset not in MTGNET_FILES:
        raise ValueError(f"unknown MTG-Net dataset {dataset!r}; expected one of {sorted(MTGNET_FILES)}")
    files = MTGNET_FILES[dataset]
    if kind == "measured" and "measured" not in files:
        kind = "valid"
    if kind not in files:
        raise ValueError(f"dataset {dataset!r} has no {kind!r} gains; expected one of {sorted(files)}")
    mask_file, gain_file = files[kind]
    root = Path(root)
    return GainTable.load(root / mask_file, root / gain_file, MTGNET_TASKS[dataset])


def grouping_gain(table: GainTable, grouping: Grouping) -> float:
    """Total gain of a grouping under ``table``: the sum over tasks of the gain of each task in the
    group serving it (a singleton group contributes 0). Raises if a serving group was not measured."""
    total = 0.0
    for task, k in grouping.serves.items():
        group = grouping.groups[k]
        if len(group) == 1:
            continue
        total += table(group)[task]
    return total
