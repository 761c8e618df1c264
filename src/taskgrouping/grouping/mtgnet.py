"""MTG-Net: multi-task grouping by meta-learning on task combinations (Song et al., NeurIPS 2022).

The meta-learner maps a task combination (a 0/1 mask over the N tasks) to the *gain* of every
task in it: its relative improvement when trained in that combination instead of alone (0 for a
task trained alone). It is trained on the combinations actually trained so far; an active
sampling loop picks which combination to train next; the grouping is then searched on the gains.

* :class:`MetaLearner` — learned task embeddings, self-attention restricted to the tasks in the
  combination (scaled dot product with an extra temperature 0.2), residual + LayerNorm,
  position-wise FFN, one linear output per task (paper Sec. 4.1).
* :func:`fit_meta_learner` — L1 loss on present tasks, Adam(lr 7e-3; the paper's weight decay is 5e-4,
  the default here 5e-3, see :class:`MTGNetConfig`), an ensemble trained in one batched pass.
* :func:`active_sampling` — start from all singles + the all-task set; each round retrain, then
  for task ``c`` (cycling) train the untrained candidate with the largest ``|predicted gain of c|``
  (paper Sec. 4.2, "per-task" active strategy); ``N(N-1)/2`` rounds by default. Our additions,
  on by default where they are cheap: the leave-one-out groups as the first acquisitions when
  they take at most a third of the budget, and for small N a *challenger* acquisition that trains
  the untrained group of the partition that could still beat the best verified one (measured
  gains where trained, optimistic ensemble predictions elsewhere).
* :func:`search_groups` — pick <= K groups: a *partition* maximising total gain (cost 1 per group;
  exact memoised search over partitions for small N, a set-partitioning MILP for large candidate
  pools), or, with ``overlap=True``, the network-selection form the authors' code uses (each task
  takes its best gain among the chosen groups).
* :func:`beam_partition_search` — greedy/beam merging for large N when no candidate pool bounds
  the search (gains come from the meta-learner for arbitrary combinations).
* :class:`GainTable` — measured gains per combination (the files in
  ``grouping-data/mtg_net/collected_gain``); it answers gains instead of training networks
  ("oracle mode") and scores a grouping (:func:`grouping_gain`).
* :func:`mtgnet_search` — the whole pipeline.
"""

from __future__ import annotations

import itertools
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.grouping.tag import best_cover

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


# --------------------------------------------------------------------------------------------
# Measured gains
# --------------------------------------------------------------------------------------------

def _read_numeric_table(path: Path) -> np.ndarray:
    """Rows of numbers separated by commas and/or whitespace, no header; errors name file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"gain file {str(path)!r} does not exist")
    rows: list[list[float]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected numbers only (no header), got {line.strip()[:80]!r}") from None
        if rows and len(values) != len(rows[0]):
            raise ValueError(f"{path}:{lineno}: {len(values)} columns, but the first row has {len(rows[0])}")
        rows.append(values)
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    return np.asarray(rows, dtype=np.float64)


def _bits(mask_row: np.ndarray) -> int:
    return int(sum(1 << int(i) for i in np.flatnonzero(mask_row)))


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
        if masks.shape[1] > 62:
            raise ValueError(f"{where}: at most 62 tasks are supported, got {masks.shape[1]}")
        if not np.isin(masks, (0, 1)).all():
            r, c = np.argwhere(~np.isin(masks, (0, 1)))[0]
            raise ValueError(f"{where}: mask row {r}, task {tasks[c]!r} is {masks[r, c]!r}; masks must be 0/1")
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
            b = _bits(row)
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
        return self._index.get(_bits(np.asarray(mask, dtype=bool)))

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


# --------------------------------------------------------------------------------------------
# The meta-learner
# --------------------------------------------------------------------------------------------

class MetaLearner(nn.Module):
    """Predicts per-task gains of a task combination (MTG-Net, Song et al. 2022, Sec. 4.1).

    Input: ``mask[B, N]`` (bool or 0/1). Each task ``t`` starts from a learned embedding ``e_t``;
    every layer lets each task attend only to the tasks present in the combination
    (single-head ``softmax(q k^T / (sqrt(d) * 0.2))`` with absent keys masked), followed by residual +
    LayerNorm and a position-wise FFN with residual + LayerNorm. A per-task linear read-out gives
    task ``t``'s predicted gain.

    ``members`` independently initialised learners are held as one module with a leading member
    axis on every weight, so that an ensemble trains and predicts in one batched pass (member ``m``
    computes exactly what a single learner with its weights would; Adam updates are element-wise,
    so training them together with the sum of their losses is training each alone).
    Output ``[members, B, N]``, zero for absent tasks.
    """

    def __init__(self, n_tasks: int, dim: int = 32, layers: int = 2, ffn_dim: int | None = None,
                 temperature: float = 0.2, dropout: float = 0.0, members: int = 1) -> None:
        super().__init__()
        if n_tasks < 1 or dim < 1 or layers < 1 or members < 1:
            raise ValueError(f"n_tasks, dim, layers and members must be positive, got {n_tasks}, {dim}, {layers}, "
                             f"{members}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        ffn_dim = ffn_dim or dim
        self.n_tasks, self.dim, self.members, self.dropout = n_tasks, dim, members, dropout
        self.scale = 1.0 / (math.sqrt(dim) * temperature)

        def linear(fan_in: int, fan_out: int) -> nn.ParameterList:  # nn.Linear's default initialisation
            bound = 1.0 / math.sqrt(fan_in)
            return nn.ParameterList([nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound)),
                                     nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))])

        def norm() -> nn.ParameterList:
            return nn.ParameterList([nn.Parameter(torch.ones(members, 1, dim)),
                                     nn.Parameter(torch.zeros(members, 1, dim))])

        self.embedding = nn.Parameter(torch.randn(members, n_tasks, dim) * 0.5)
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": linear(dim, 3 * dim), "out": linear(dim, dim),
                                                   "norm1": norm(), "ffn1": linear(dim, ffn_dim),
                                                   "ffn2": linear(ffn_dim, dim),
                                                   "norm2": norm()}) for _ in range(layers))
        self.readout_weight = nn.Parameter(torch.randn(members, n_tasks, dim) / math.sqrt(dim))
        self.readout_bias = nn.Parameter(torch.zeros(members, n_tasks))

    def forward(self, mask: Tensor) -> Tensor:
        present = mask.bool()
        if present.dim() != 2 or present.shape[1] != self.n_tasks:
            raise ValueError(f"mask must have shape [B, {self.n_tasks}], got {tuple(mask.shape)}")
        if not present.any(dim=1).all():
            raise ValueError("every combination must contain at least one task")
        m, (b, n), d = self.members, present.shape, self.dim
        x = self.embedding[:, None].expand(m, b, n, d).reshape(m, b * n, d)
        absent = ~present[None, :, None, :]  # [1, B, query, key]

        def affine(p: nn.ParameterList, h: Tensor) -> Tensor:
            return torch.baddbmm(p[1], h, p[0])

        def drop(h: Tensor) -> Tensor:
            return F.dropout(h, self.dropout, self.training)

        for blk in self.blocks:
            q, k, v = affine(blk["qkv"], x).view(m, b, n, 3 * d).split(d, dim=-1)
            attn = (q @ k.transpose(-1, -2) * self.scale).masked_fill(absent, float("-inf")).softmax(dim=-1)
            x = F.layer_norm(x + drop(affine(blk["out"], (attn @ v).reshape(m, b * n, d))), (d,))
            x = x * blk["norm1"][0] + blk["norm1"][1]
            x = F.layer_norm(x + drop(affine(blk["ffn2"], torch.relu(affine(blk["ffn1"], x)))), (d,))
            x = x * blk["norm2"][0] + blk["norm2"][1]
        out = (x.view(m, b, n, d) * self.readout_weight[:, None]).sum(-1) + self.readout_bias[:, None]
        return out * present


@dataclass(frozen=True)
class MTGNetConfig:
    """Hyper-parameters of the meta-learner and the active sampling loop.

    ``lr`` and ``temperature`` are the paper's. The defaults were chosen on the oracle-mode success
    rate on Taskonomy-5 / ETTm1-7 over 40-80 seeds (``benchmarks/bench_mtgnet.py``): with N(N-1)/2
    acquisitions the meta-learner sees 16 (resp. 29) combinations and barely generalises, so a
    small, regularised learner (dim 8, one layer, weight decay 5e-3 instead of the paper's 5e-4),
    a 16-member ensemble (the authors' code uses 2; 3, 8, 16 and 32 tried: 16 found the best
    Taskonomy partition in 148 of 160 searches, 32 in 144) warm-started for 20 full-batch epochs per
    retraining, the challenger acquisition with ``ucb_beta`` 0.5 (0, 0.5, 1, 2 and 3 tried) and
    the leave-one-out initial design did best among the settings tried. The authors train a
    128-wide, 2-layer learner up to 10,000 epochs (early stopping on the training loss) on a GPU.

    Attributes:
        rounds: combinations acquired by active sampling after the initial singles + all-task set;
            ``None`` = ``N(N-1)/2`` (the paper's budget).
        picks_per_round: acquisitions per retraining (1 = the paper). Larger values retrain less
            often (faster); the task whose gain drives a pick still cycles per acquisition.
        acquisition: ``"auto"`` (default: ``"search"`` for ``N <= SEARCH_GUIDED_MAX_TASKS``, where
            the partition search per pick is exact and cheap, else ``"active"``), ``"active"`` (the
            paper's rule), ``"search"`` (the challenger acquisition, see :func:`active_sampling`;
            our addition, not the paper's) or ``"random"`` (uniform among the untrained
            candidates; the paper's ablation baseline, seeded by ``seed``).
        guide_k: the most groups the ``"search"`` acquisition plans for (``None`` = N;
            :func:`mtgnet_search` sets it to its ``k``).
        ucb_beta: optimism of the ``"search"`` acquisition: ensemble mean + ``ucb_beta`` x ensemble
            standard deviation (needs ``ensemble > 1`` to matter).
        initial: ``"paper"`` (singles + the all-task set), ``"leave_one_out"`` (then the N groups of
            N - 1 tasks that are among the candidates, as the first acquisitions, counted in the
            budget) or ``"auto"`` (default: leave-one-out when N >= 3 and those N trainings take at
            most a third of the budget, i.e. N >= 7 with the paper's budget). The all-task set
            tells how every task fares with all the others; the leave-one-out groups tell what
            each task does to the rest, which no other N trainings show as directly (a one-factor-
            at-a-time design). On ETTm1-7 the best partition is one task alone and the other six
            together, a group the meta-learner, trained on mostly-negative pair gains, does not
            rank high enough to try.
        dropout: dropout after attention and FFN (the authors' code uses 0.5).
        warm_start: continue from the previous retraining's weights instead of starting afresh (the
            paper retrains from scratch), which allows fewer epochs per retraining.
        ensemble: number of independently initialised meta-learners whose predictions are averaged.
        threads: torch CPU threads used while the searcher runs (restored afterwards).
        pool_size: size of the random candidate pool drawn when N > 16 and no pool is given.
    """

    dim: int = 8
    layers: int = 1
    ffn_dim: int | None = None
    temperature: float = 0.2
    dropout: float = 0.0
    lr: float = 7e-3
    weight_decay: float = 5e-3
    epochs: int = 20
    rounds: int | None = None
    picks_per_round: int = 1
    acquisition: Literal["auto", "active", "search", "random"] = "auto"
    guide_k: int | None = None
    ucb_beta: float = 0.5
    initial: Literal["auto", "paper", "leave_one_out"] = "auto"
    warm_start: bool = True
    ensemble: int = 16
    seed: int = 0
    threads: int | None = 1
    pool_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "epochs", "picks_per_round", "ensemble", "pool_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MTGNetConfig.{name} must be a positive integer, got {value!r}")
        if self.rounds is not None and (not isinstance(self.rounds, int) or self.rounds < 0):
            raise ValueError(f"MTGNetConfig.rounds must be None or a non-negative integer, got {self.rounds!r}")
        if self.initial not in ("auto", "paper", "leave_one_out"):
            raise ValueError(f"MTGNetConfig.initial must be 'auto', 'paper' or 'leave_one_out', got {self.initial!r}")
        if self.acquisition not in ("auto", "active", "search", "random"):
            raise ValueError(f"MTGNetConfig.acquisition must be 'auto', 'active', 'search' or 'random', "
                             f"got {self.acquisition!r}")
        if self.guide_k is not None and (not isinstance(self.guide_k, int) or self.guide_k < 1):
            raise ValueError(f"MTGNetConfig.guide_k must be None or a positive integer, got {self.guide_k!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MTGNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr <= 0 or self.temperature <= 0 or self.weight_decay < 0:
            raise ValueError("MTGNetConfig needs lr > 0, temperature > 0 and weight_decay >= 0")


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit_meta_learner(masks: np.ndarray, gains: np.ndarray, config: MTGNetConfig = MTGNetConfig(),
                     model: MetaLearner | None = None, seed: int | None = None) -> MetaLearner:
    """Train a :class:`MetaLearner` ensemble of ``config.ensemble`` members on measured combinations
    (full batch, ``config.epochs`` Adam steps; each member's loss is the L1 error on present tasks).

    ``model`` continues training an existing learner; otherwise a fresh one is initialised from
    ``seed`` (default ``config.seed``), which also seeds the dropout masks; the global RNG is untouched.
    """
    masks_t = torch.from_numpy(np.array(masks, dtype=bool))
    gains_t = torch.from_numpy(np.array(gains, dtype=np.float32))
    if masks_t.shape != gains_t.shape or masks_t.dim() != 2:
        raise ValueError(f"masks and gains must both be [M, N], got {tuple(masks_t.shape)} and {tuple(gains_t.shape)}")
    if model is not None and model.n_tasks != masks_t.shape[1]:
        raise ValueError(f"the learner predicts {model.n_tasks} tasks but the masks have {masks_t.shape[1]} columns")
    with _torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)  # initialisation and dropout masks
        if model is None:
            model = MetaLearner(masks_t.shape[1], config.dim, config.layers, config.ffn_dim, config.temperature,
                                config.dropout, members=config.ensemble)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        present = masks_t.float()
        model.train()
        for _ in range(config.epochs):
            opt.zero_grad(set_to_none=True)
            err = (model(masks_t) - gains_t).abs() * present  # [members, M, N]
            loss = err.sum(dim=(1, 2)).sum() / present.sum()  # sum over members of each member's mean
            loss.backward()
            opt.step()
        model.eval()
    return model


@torch.no_grad()
def predict_gains(model: MetaLearner, masks: np.ndarray, *, per_member: bool = False,
                  batch_size: int = 8192) -> np.ndarray:
    """Predicted per-task gains for bool masks: the ensemble mean ``[B, N]``, or with ``per_member``
    every member's ``[members, B, N]``; singletons are 0 by definition."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros((model.members, *masks.shape), dtype=np.float64)
    model.eval()
    for start in range(0, len(masks), batch_size):
        chunk = torch.from_numpy(masks[start:start + batch_size].copy())
        out[:, start:start + batch_size] = model(chunk).double().numpy()
    out[:, masks.sum(axis=1) == 1] = 0.0
    return out if per_member else out.mean(axis=0)


# --------------------------------------------------------------------------------------------
# Active sampling
# --------------------------------------------------------------------------------------------

Evaluate = Callable[[tuple[str, ...]], Mapping[str, float]]


@dataclass
class ActiveSamplingResult:
    """What the active loop trained and learned.

    ``sampled_masks``/``sampled_gains`` are the trained combinations in the order they were trained
    (the initial singles + all-task set first); ``model`` is the meta-learner ensemble retrained on
    all of them; ``picks`` lists (driving task, combination) per acquisition; the driving task is
    ``""`` for random picks, the task left out for leave-one-out picks and, for challenger picks, the
    first task of the combination.
    """

    tasks: list[str]
    sampled_masks: np.ndarray
    sampled_gains: np.ndarray
    model: MetaLearner
    picks: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def n_sampled(self) -> int:
        return len(self.sampled_masks)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Ensemble-mean predicted gains ``[B, N]`` (singletons 0)."""
        return predict_gains(self.model, masks)


def _all_subsets(n: int) -> np.ndarray:
    codes = np.arange(1, 1 << n, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)


def _random_pool(n: int, size: int, seed: int) -> np.ndarray:
    """Singles, pairs and random larger combinations (uniform size, then uniform members)."""
    rng = np.random.default_rng(seed)
    rows = {(1 << i) for i in range(n)} | {(1 << i) | (1 << j) for i in range(n) for j in range(i + 1, n)}
    rows.add((1 << n) - 1)
    attempts = 0
    while len(rows) < size and attempts < 50 * size:
        attempts += 1
        r = int(rng.integers(3, n + 1))
        rows.add(int(sum(1 << int(i) for i in rng.choice(n, size=r, replace=False))))
    codes = np.array(sorted(rows), dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)


def _query(evaluate: Evaluate, tasks: Sequence[str], mask: np.ndarray) -> np.ndarray:
    combo = tuple(t for t, m in zip(tasks, mask) if m)
    answer = evaluate(combo)
    missing = [t for t in combo if t not in answer]
    if missing:
        raise ValueError(f"the gain evaluator returned no gain for tasks {missing} of combination {list(combo)}")
    row = np.zeros(len(tasks))
    for i, t in enumerate(tasks):
        if mask[i]:
            row[i] = float(answer[t])
    if mask.sum() == 1:
        row[:] = 0.0  # a task trained alone has no gain over itself
    return row


#: Largest N for which ``acquisition="auto"`` uses the challenger rule (an exact partition
#: search per acquisition; its cost grows like 3^N).
SEARCH_GUIDED_MAX_TASKS = 10


def _acquisition(config: MTGNetConfig, n_tasks: int) -> str:
    if config.acquisition == "auto":
        return "search" if n_tasks <= SEARCH_GUIDED_MAX_TASKS else "active"
    return config.acquisition


def _initial_design(config: MTGNetConfig, n_tasks: int, budget: int) -> str:
    if config.initial == "auto":
        return "leave_one_out" if n_tasks > 2 and 3 * n_tasks <= budget else "paper"
    return config.initial


def _challenger_pick(n_tasks: int, sampled_masks: Sequence[np.ndarray], sampled_gains: Sequence[np.ndarray],
                     pool_masks: np.ndarray, available: np.ndarray, optimistic: np.ndarray, k: int) -> int:
    """Index into ``pool_masks`` of the untrained group to train next, or -1 when none fits a partition.

    The *challenger* is the best partition into ``<= k`` groups that contains at least one untrained
    group, valued by the measured total gain of trained groups and the ``optimistic`` total of
    untrained ones: the partition that could still beat the best partition of trained groups. Its
    value is ``max_g optimistic[g] + best(complement of g, k - 1)`` over untrained groups ``g``
    (``best`` over all groups, trained or not); the maximising ``g`` is returned.
    """
    idx = np.flatnonzero(available)
    codes = [_bits(m) for m in sampled_masks] + [_bits(pool_masks[j]) for j in idx]
    totals = [float(g.sum()) for g in sampled_gains] + [float(optimistic[j]) for j in idx]
    best = _partition_solver(codes, totals, n_tasks)
    full = (1 << n_tasks) - 1
    pick, top = -1, -math.inf
    for j, code in zip(idx, codes[len(sampled_masks):]):
        value = float(optimistic[j]) + best(full & ~code, k - 1)[0]
        if value > top:
            pick, top = int(j), value
    return pick


def active_sampling(tasks: Sequence[str], evaluate: Evaluate, candidates: np.ndarray,
                    config: MTGNetConfig = MTGNetConfig()) -> ActiveSamplingResult:
    """MTG-Net's active collection of meta-training combinations (paper Sec. 4.2).

    Starts from all singles and the all-task combination, then makes ``config.rounds`` (default
    ``N(N-1)/2``) acquisitions — the first N of them the leave-one-out groups when
    ``config.initial`` asks for them (driving task: the one left out) — retraining the
    meta-learner every ``config.picks_per_round`` of them (warm-started if
    ``config.warm_start``); stops early when every candidate is trained, and
    retrains once more on everything at the end. An acquisition trains (``evaluate``) one untrained
    candidate, chosen by ``config.acquisition``:

    * ``"active"`` (the paper's per-task rule): acquisition ``a`` drives on task ``c = a mod N``
      and trains the untrained candidate containing ``c`` whose predicted gain for ``c`` is largest
      in absolute value (the next task is tried when no untrained candidate contains ``c``).
    * ``"search"`` (our addition; default for ``N <= SEARCH_GUIDED_MAX_TASKS``): train the untrained
      group of the best *unverified* partition (:func:`_challenger_pick`), valued with measured
      gains where trained and optimistic predictions elsewhere (ensemble mean + ``ucb_beta`` x
      ensemble standard deviation of the group's total gain), for partitions into at most
      ``config.guide_k`` groups. This is optimism in the face of uncertainty over partitions, as
      in combinatorial UCB (Chen et al., ICML 2013), and, like
      LUCB's challenger (Kalyanakrishnan et al., ICML 2012), it keeps testing the strongest
      alternative to the best partition already trained rather than stopping once that partition
      is verified. Falls back to the paper's rule when no untrained candidate fits a partition.
    * ``"random"``: uniform among the untrained candidates (the paper's ablation), seeded by ``seed``.

    Args:
        tasks: task names (mask columns).
        evaluate: trains a combination (tuple of task names) and returns ``{task: gain}`` — a
            :class:`GainTable` in oracle mode.
        candidates: ``bool[M, N]`` pool of combinations the loop may pick from.
    """
    tasks = list(tasks)
    n = len(tasks)
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.ndim != 2 or candidates.shape[1] != n:
        raise ValueError(f"candidates must be a bool array [M, {n}], got shape {candidates.shape}")
    budget = n * (n - 1) // 2 if config.rounds is None else config.rounds
    initial = np.vstack([np.eye(n, dtype=bool), np.ones((1, n), dtype=bool)]) if n > 1 else np.ones((1, 1), bool)
    seen = {_bits(m) for m in initial}
    sampled_masks = list(initial)
    sampled_gains = [_query(evaluate, tasks, m) for m in initial]
    untrained = []
    for i, m in enumerate(candidates):  # each distinct, not yet trained candidate once
        if _bits(m) not in seen:
            seen.add(_bits(m))
            untrained.append(i)
    picks: list[tuple[str, tuple[str, ...]]] = []
    model: MetaLearner | None = None
    retrain = 0
    acquisition = _acquisition(config, n)

    def train(mask: np.ndarray, driver: str) -> None:
        sampled_masks.append(mask)
        sampled_gains.append(_query(evaluate, tasks, mask))
        picks.append((driver, tuple(t for t, m in zip(tasks, mask) if m)))

    if _initial_design(config, n, budget) == "leave_one_out":
        where = {_bits(candidates[i]): i for i in untrained}
        for out in range(n):  # the leave-one-out groups among the candidates, as the first acquisitions
            i = where.get(_bits(np.arange(n) != out))
            if i is not None and len(picks) < budget:
                untrained.remove(i)
                train(candidates[i], tasks[out])
    if acquisition == "random":
        order = np.random.default_rng(config.seed).permutation(len(untrained))[:budget - len(picks)]
        for i in order:
            train(candidates[untrained[i]], "")
        untrained = []

    def retrained(previous: MetaLearner | None) -> MetaLearner:
        return fit_meta_learner(np.array(sampled_masks), np.array(sampled_gains), config,
                                model=previous if config.warm_start else None, seed=config.seed * 1009 + retrain)

    with _torch_threads(config.threads):
        while len(picks) < budget and untrained:
            model = retrained(model)
            retrain += 1
            pool = np.array(untrained)
            pool_masks = candidates[pool]
            per_member = predict_gains(model, pool_masks, per_member=True)
            pred = np.abs(per_member.mean(axis=0))
            totals = per_member.sum(axis=2)  # [members, pool]
            optimistic = totals.mean(axis=0) + config.ucb_beta * totals.std(axis=0)
            available = np.ones(len(pool), dtype=bool)
            for _ in range(min(config.picks_per_round, budget - len(picks), len(pool))):
                j = -1
                if acquisition == "search":
                    j = _challenger_pick(n, sampled_masks, sampled_gains, pool_masks, available, optimistic,
                                         min(config.guide_k or n, n))
                if j >= 0:
                    c = int(np.flatnonzero(pool_masks[j])[0])
                else:
                    for offset in range(n):
                        c = (len(picks) + offset) % n
                        holders = np.flatnonzero(available & pool_masks[:, c])
                        if len(holders):
                            break
                    j = int(holders[np.argmax(pred[holders, c])])  # first maximum: earliest candidate
                available[j] = False
                train(pool_masks[j], tasks[c])
            untrained = pool[available].tolist()
        model = retrained(model)
    return ActiveSamplingResult(tasks, np.array(sampled_masks), np.array(sampled_gains), model, picks)


# --------------------------------------------------------------------------------------------
# Group search
# --------------------------------------------------------------------------------------------

def _with_singletons(masks: np.ndarray, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = masks.shape[1]
    have = {_bits(m) for m in masks}
    add = [i for i in range(n) if (1 << i) not in have]
    if not add:
        return masks, gains
    eye = np.eye(n, dtype=bool)[add]
    return np.vstack([masks, eye]), np.vstack([gains, np.zeros((len(add), n))])


def _partition_solver(codes: Sequence[int], totals: Sequence[float], n: int
                      ) -> Callable[[int, int], tuple[float, tuple[int, ...]]]:
    """Memoised exact partition search over candidate blocks (bit codes with their totals).

    The returned ``best(remaining, left)`` gives the largest total of a partition of the task set
    ``remaining`` (a bit code) into at most ``left`` candidate blocks and the chosen candidates'
    indices (``-inf`` when none exists); each block is the one holding the lowest remaining task,
    so every partition is visited once.
    """
    by_lowest: list[list[tuple[int, float, int]]] = [[] for _ in range(n)]
    for i, (code, tot) in enumerate(zip(codes, totals)):
        low = (code & -code).bit_length() - 1
        by_lowest[low].append((code, float(tot), i))
    for lst in by_lowest:  # deterministic preference: larger total first, then earlier row
        lst.sort(key=lambda e: (-e[1], e[2]))

    @lru_cache(maxsize=None)
    def best(remaining: int, left: int) -> tuple[float, tuple[int, ...]]:
        if remaining == 0:
            return 0.0, ()
        if left <= 0:
            return -math.inf, ()
        low = (remaining & -remaining).bit_length() - 1
        top, choice = -math.inf, ()
        for code, tot, i in by_lowest[low]:
            if code & ~remaining:
                continue
            val, rest = best(remaining & ~code, left - 1)
            if val + tot > top:
                top, choice = val + tot, (i,) + rest
        return top, choice

    return best


def _partition_exhaustive(masks: np.ndarray, totals: np.ndarray, k: int) -> list[int]:
    """Exact best partition into <= k candidate blocks, by memoised search over exact covers."""
    n = masks.shape[1]
    value, chosen = _partition_solver([_bits(m) for m in masks], totals, n)((1 << n) - 1, k)
    if value == -math.inf:
        raise ValueError(f"no partition of the tasks into at most {k} candidate groups exists")
    return list(chosen)


def _partition_milp(masks: np.ndarray, totals: np.ndarray, k: int) -> list[int]:
    """Set-partitioning integer program: pick candidates covering every task exactly once, <= k."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    m, n = masks.shape
    a = np.vstack([masks.T.astype(float), np.ones((1, m))])
    lb = np.concatenate([np.ones(n), [1.0]])
    ub = np.concatenate([np.ones(n), [float(k)]])
    res = milp(-np.asarray(totals, float), constraints=LinearConstraint(a, lb, ub),
               integrality=np.ones(m), bounds=Bounds(0, 1))
    if res.x is None:
        raise ValueError(f"no partition of the tasks into at most {k} candidate groups exists ({res.message})")
    return np.flatnonzero(res.x > 0.5).tolist()


def search_groups(tasks: Sequence[str], masks: np.ndarray, gains: np.ndarray, k: int, *,
                  overlap: bool = False, method: Literal["auto", "exhaustive", "milp", "local"] = "auto",
                  exhaustive_max_tasks: int = 12) -> Grouping:
    """Choose at most ``k`` groups among candidate combinations from their per-task gains.

    Args:
        tasks: names of the mask columns.
        masks: ``bool[M, N]`` candidate groups; singletons are always available with gain 0.
        gains: ``float[M, N]`` gain of each member task in each candidate (measured or predicted).
        k: largest number of groups; each group costs 1.
        overlap: ``False`` (default) = a partition maximising the total gain
            ``sum_groups sum_{t in group} gain(group, t)``. ``True`` = the network-selection form of
            the MTG-Net authors' search: groups may overlap, every task must be covered, each task
            counts its best gain among the chosen groups and is served by that group.
        method: partition: ``"exhaustive"`` = exact memoised search over all partitions built from
            the candidates (used for ``N <= exhaustive_max_tasks``), ``"milp"`` = set-partitioning
            integer program (SciPy HiGHS). Overlap: exhaustive over combinations, facility-location
            MILP, or beam + swap local search for large pools such as MIMIC's 3,185 combinations
            (:func:`taskgrouping.grouping.tag.best_cover`; ``"auto"`` chooses by size).

    Returns:
        a :class:`Grouping` (groups in the order chosen; tasks in column order) whose ``info`` holds
        ``objective`` (total gain under ``gains``) and ``group_gains``.
    """
    tasks = list(tasks)
    n = len(tasks)
    masks = np.asarray(masks, dtype=bool)
    gains = np.asarray(gains, dtype=np.float64)
    if masks.ndim != 2 or masks.shape[1] != n or masks.shape != gains.shape:
        raise ValueError(f"masks and gains must both be [M, {n}] for tasks {tasks}; got {masks.shape} and {gains.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    if not masks.any(axis=1).all():
        raise ValueError(f"candidate row {int(np.flatnonzero(~masks.any(axis=1))[0])} selects no task")
    gains = np.where(masks, gains, 0.0)
    gains[masks.sum(axis=1) == 1] = 0.0
    masks, gains = _with_singletons(masks, gains)
    if overlap:
        scores = np.where(masks, gains, -np.inf)
        chosen, solver = best_cover(scores, int(k), method=method)
        sub = scores[chosen]
        best = sub.argmax(axis=0)
        used = sorted(set(best.tolist()))
        rows = [chosen[u] for u in used]
        serves = {tasks[t]: used.index(int(best[t])) for t in range(n)}
        objective = float(sub[best, np.arange(n)].sum())
    else:
        totals = gains.sum(axis=1)
        solver = method
        if solver == "auto":
            solver = "exhaustive" if n <= exhaustive_max_tasks else "milp"
        if solver == "exhaustive":
            rows = _partition_exhaustive(masks, totals, int(k))
        elif solver == "milp":
            rows = _partition_milp(masks, totals, int(k))
        else:
            raise ValueError(f"a partition search takes method 'auto', 'exhaustive' or 'milp', got {method!r}")
        serves = {tasks[t]: g for g, r in enumerate(rows) for t in np.flatnonzero(masks[r])}
        objective = float(totals[rows].sum())
    groups = tuple(tuple(tasks[t] for t in np.flatnonzero(masks[r])) for r in rows)
    group_gains = [float(gains[r][masks[r]].sum()) for r in rows]
    return Grouping(groups, serves, {"k": int(k), "overlap": overlap, "solver": solver,
                                     "objective": objective, "group_gains": group_gains})


def beam_partition_search(tasks: Sequence[str], gain_fn: Callable[[np.ndarray], np.ndarray], k: int, *,
                          beam_width: int = 8) -> Grouping:
    """Approximate best partition into <= ``k`` groups when combinations cannot be enumerated.

    Starts from all singletons and repeatedly merges two groups, keeping the ``beam_width`` best
    partitions per level (scored by ``gain_fn``: ``bool[B, N]`` masks -> ``float[B, N]`` per-task
    gains, e.g. the meta-learner's predictions). Merging continues down to one group; the best
    partition seen with at most ``k`` groups is returned.
    """
    tasks = list(tasks)
    n = len(tasks)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    cache: dict[int, float] = {(1 << i): 0.0 for i in range(n)}

    def totals(codes: list[int]) -> None:
        new = sorted({c for c in codes if c not in cache})
        if new:
            masks = ((np.array(new, dtype=np.int64)[:, None] >> np.arange(n)) & 1).astype(bool)
            g = np.asarray(gain_fn(masks), dtype=np.float64)
            for c, row, mask in zip(new, g, masks):
                cache[c] = float(row[mask].sum())

    beam: list[tuple[float, tuple[int, ...]]] = [(0.0, tuple(1 << i for i in range(n)))]
    best: tuple[float, tuple[int, ...]] | None = beam[0] if n <= k else None
    while len(beam[0][1]) > 1:
        moves = []
        for _, parts in beam:
            for a, b in itertools.combinations(range(len(parts)), 2):
                moves.append((parts, a, b, parts[a] | parts[b]))
        totals([mv[3] for mv in moves])
        scored: dict[tuple[int, ...], float] = {}
        for parts, a, b, merged in moves:
            new = tuple(sorted([p for i, p in enumerate(parts) if i not in (a, b)] + [merged]))
            if new not in scored:
                scored[new] = sum(cache[p] for p in new)
        beam = sorted(((v, p) for p, v in scored.items()), key=lambda e: (-e[0], e[1]))[:beam_width]
        if len(beam[0][1]) <= k and (best is None or beam[0][0] > best[0]):
            best = beam[0]
    assert best is not None
    value, parts = best
    parts = sorted(parts, key=lambda c: c & -c)  # groups ordered by their first task
    groups = [tuple(tasks[t] for t in range(n) if (p >> t) & 1) for p in parts]
    return Grouping.partition(groups, k=int(k), overlap=False, objective=float(value),
                              group_gains=[cache[p] for p in parts])


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def default_candidates(tasks: Sequence[str], evaluate: Evaluate | GainTable,
                       config: MTGNetConfig = MTGNetConfig()) -> tuple[np.ndarray, bool]:
    """The candidate pool :func:`mtgnet_search` uses, and whether it is the whole search space.

    The table's combinations in oracle mode; all ``2^N - 1`` combinations for ``N <= 16``;
    otherwise a seeded pool of ``config.pool_size`` combinations (singles, pairs, random larger
    sets) for sampling only — the final partition is then searched over arbitrary combinations.
    """
    n = len(tasks)
    if isinstance(evaluate, GainTable):
        return np.asarray(evaluate.masks), True
    if n <= 16:
        return _all_subsets(n), True
    return _random_pool(n, config.pool_size, config.seed), False


def search_from_sampling(result: ActiveSamplingResult, k: int, candidates: np.ndarray | None, *,
                         overlap: bool = False, gain_source: Literal["hybrid", "predicted"] = "hybrid",
                         beam_width: int = 8, threads: int | None = 1) -> Grouping:
    """Group search on the gains an :func:`active_sampling` run knows.

    ``gain_source="hybrid"`` (default, as in the authors' code) uses the measured gains of the
    combinations trained during sampling and the ensemble's predictions elsewhere;
    ``"predicted"`` uses predictions only. With ``candidates`` (``bool[M, N]``) the search is exact
    over those combinations (:func:`search_groups`); with ``None`` it is
    :func:`beam_partition_search` over arbitrary combinations.
    """
    if gain_source not in ("hybrid", "predicted"):
        raise ValueError(f"gain_source must be 'hybrid' or 'predicted', got {gain_source!r}")
    tasks = result.tasks
    measured = {_bits(m): g for m, g in zip(result.sampled_masks, result.sampled_gains)}

    def gains_for(masks: np.ndarray) -> np.ndarray:
        with _torch_threads(threads):
            out = result.predict(masks)
        if gain_source == "hybrid":
            for i, m in enumerate(masks):
                hit = measured.get(_bits(m))
                if hit is not None:
                    out[i] = hit
        return out

    if candidates is not None:
        candidates = np.asarray(candidates, dtype=bool)
        grouping = search_groups(tasks, candidates, gains_for(candidates), k, overlap=overlap)
    else:
        if overlap:
            raise ValueError("overlap=True needs an explicit candidate pool")
        grouping = beam_partition_search(tasks, gains_for, k, beam_width=beam_width)
    info = dict(grouping.info)
    info.update({"method": "mtgnet", "gain_source": gain_source, "n_sampled": result.n_sampled,
                 "sampled": [[t for t, m in zip(tasks, mask) if m] for mask in result.sampled_masks]})
    return Grouping(grouping.groups, grouping.serves, info)


def mtgnet_search(tasks: Sequence[str] | None, evaluate: Evaluate | GainTable, k: int, *,
                  candidates: np.ndarray | None = None, config: MTGNetConfig = MTGNetConfig(),
                  overlap: bool = False, gain_source: Literal["hybrid", "predicted"] = "hybrid",
                  beam_width: int = 8) -> Grouping:
    """Active sampling + meta-learning + group search (MTG-Net), end to end.

    Args:
        tasks: task names; ``None`` takes them from a :class:`GainTable` ``evaluate``.
        evaluate: trains a combination and returns ``{task: gain}``; a :class:`GainTable` here is
            the oracle mode (no network is trained; the table answers).
        k: largest number of groups (cost 1 each).
        candidates: ``bool[M, N]`` combinations the sampler and the search may use; default
            :func:`default_candidates`.
        overlap, gain_source, beam_width: see :func:`search_groups` and :func:`search_from_sampling`.

    Returns:
        a :class:`Grouping`; ``info`` records the number of trained combinations, the objective under
        the gains used, and the combinations trained.
    """
    if isinstance(evaluate, GainTable):
        if tasks is None:
            tasks = list(evaluate.tasks)
        elif list(tasks) != list(evaluate.tasks):
            raise ValueError(f"tasks {list(tasks)} do not match the gain table's columns {list(evaluate.tasks)}")
    if tasks is None:
        raise ValueError("tasks are required unless evaluate is a GainTable")
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty list of unique names, got {tasks}")
    whole_space = True
    if candidates is None:
        candidates, whole_space = default_candidates(tasks, evaluate, config)
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.ndim != 2 or candidates.shape[1] != len(tasks):
        raise ValueError(f"candidates must be a bool array [M, {len(tasks)}], got shape {candidates.shape}")
    if _acquisition(config, len(tasks)) == "search" and config.guide_k is None:
        config = replace(config, guide_k=int(k))
    result = active_sampling(tasks, evaluate, candidates, config)
    return search_from_sampling(result, k, candidates if whole_space else None, overlap=overlap,
                                gain_source=gain_source, beam_width=beam_width, threads=config.threads)
