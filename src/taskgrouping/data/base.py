"""The dataset contract shared by every loader: a dataset yields ``(x, {task_name: target})``.

:class:`TaskData` bundles the three splits with the task list, the input shape and, when the data
has one, the known grouping (the planted groups; MultiMNIST's left/right digits) that the
``oracle`` method trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from taskgrouping.tasks import Task, validate_task_list


class TensorTaskDataset(Dataset):
    """In-memory dataset: inputs ``x`` (n, ...) and one target tensor (n, ...) per task.

    Indexing with a list or tensor of indices returns a whole batch, which :func:`make_loader`
    uses to avoid per-sample collation (10-50x faster for small models on CPU).
    """

    def __init__(self, x: Tensor, targets: dict[str, Tensor]) -> None:
        n = x.shape[0]
        for name, y in targets.items():
            if y.shape[0] != n:
                raise ValueError(f"task {name!r}: {y.shape[0]} targets for {n} inputs; expected one per input")
        self.x = x
        self.targets = targets

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        return self.x[index], {k: v[index] for k, v in self.targets.items()}


@dataclass
class TaskData:
    """Train / val / test splits of one multi-task dataset.

    Attributes:
        name: dataset name as given in configs.
        tasks: the tasks, in head order.
        train, val, test: datasets yielding ``(x, {task: target})``.
        input_shape: shape of one input (without the batch dimension).
        groups: the known grouping (list of task-name lists) if the data has one, else ``None``.
        info: the generating / loading parameters, recorded in results.
    """

    name: str
    tasks: list[Task]
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    groups: list[list[str]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_task_list(self.tasks)
        for split in ("train", "val", "test"):
            if len(getattr(self, split)) == 0:
                raise ValueError(f"dataset {self.name!r}: the {split} split is empty; expected at least one sample")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; dataset {self.name!r} has {self.task_names}")


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s slice of every global batch: the batches one process draws, each split into
    ``world`` contiguous parts (the first ``len % world`` one sample longer; a part may be empty).

    Shuffling draws the epoch's permutation as :class:`~torch.utils.data.RandomSampler` does (one
    int64 from torch's global RNG seeds a generator for ``randperm``, when iteration starts), so
    with the same RNG state every rank - and one process with ``world=1`` - sees the same global
    batches. Unlike :class:`~torch.utils.data.distributed.DistributedSampler` it never repeats a
    sample to even out the ranks, so a distributed epoch is one process's epoch exactly.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool = False, rank: int = 0,
                 world: int = 1) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} ranks; expected 0 <= rank < world")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield torch.tensor_split(batch, self.world)[self.rank].tolist()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False,
                num_workers: int = 0, *, shard: tuple[int, int] | None = None,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``; batched indexing for :class:`TensorTaskDataset`.

    Shuffling draws from torch's global RNG when the iterator is created, so reseeding that RNG
    at the start of every epoch (as the trainer does) fixes the order and makes resume exact.
    ``shard=(rank, world)``: ``batch_size`` is the global batch, of which this loader yields rank
    ``rank``'s slice (:class:`ShardedBatchSampler`; for ``torchrun``). ``num_workers`` load batches
    in worker processes (the order still comes from the main process's RNG); ``pin_memory`` pins
    them for fast copies to a GPU.
    """
    if shard is not None:
        rank, world = shard
        sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle, drop_last, rank, world)
        if isinstance(dataset, TensorTaskDataset):
            return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                              pin_memory=pin_memory)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
    if isinstance(dataset, TensorTaskDataset):
        base = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        sampler = BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory)


def loader_shard(loader: DataLoader) -> tuple[int, int]:
    """``(rank, world)`` of a loader :func:`make_loader` sharded, else ``(0, 1)``."""
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if isinstance(sampler, ShardedBatchSampler):
        return sampler.rank, sampler.world
    return 0, 1


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Random disjoint index sets with the given fractions of ``n`` (the last takes the rest)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    out, start = [], 0
    for i, f in enumerate(fractions):
        stop = n if i == len(fractions) - 1 else start + int(round(f * n))
        out.append(perm[start:stop])
        start = stop
    return out
