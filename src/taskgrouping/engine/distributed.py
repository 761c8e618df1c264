"""Data-parallel training of one network across processes (``torchrun``): the process group, the
ranks, and the reductions that make P ranks take the step one process takes on the global batch.

``torchrun --standalone --nproc-per-node=P -m taskgrouping run ...`` starts P processes (ranks). Each
loads the same data and builds the same network (same seed); at every step rank ``r`` trains on its
slice of the same global batch (``train.batch_size`` is the global batch size:
:class:`~taskgrouping.data.base.ShardedBatchSampler`), and the ranks combine what they computed:

* task losses (:func:`task_shares`): rank ``r``'s loss of task ``t`` is rescaled to ``local sum /
  global count`` of the task's valid labels, so that the ranks' losses add up to the global batch's
  mean (missing labels included); the balancer gets a loss whose *value* is the global one and whose
  *gradient* is the rank's share;
* gradients (:meth:`Ranks.sum_grads`): every ``.grad`` the balancer writes on the network is the
  rank's share of the update; one all-reduce adds the shares after the balancer. Gradient balancers
  reduce their per-task Jacobian first (:mod:`taskgrouping.balancing.gradient_balancer`), so their
  weights are those of the global batch; a balancer's own parameters (uncertainty weights, ...) get
  the same gradient on every rank, computed from global values, and are not summed;
* randomness (:meth:`Ranks.sync_rng`): rank 0's torch RNG state is broadcast at every step, so draws
  made alike on every rank (DMTG's Gumbel noise, PCGrad's task order, RLW's weights) agree and match
  one process as long as the forward pass draws nothing whose size depends on the batch (dropout);
* evaluation (:mod:`taskgrouping.engine.evaluation`): sums and counts of every metric are added, the
  scores of the ranking metrics gathered.

Same global batch, same seed => same numbers as one process, up to the order of float additions.
BatchNorm sees each rank's slice only (no SyncBatchNorm: it needs a GPU), so networks with batch
statistics agree with one process only up to that; the built-in MLP has none.

Why not ``DistributedDataParallel``: it averages the combined gradient during backward, bucket by
bucket. That is right for equal weighting, but a gradient balancer needs every task's gradient (or
their Gramian) over the global batch *before* it combines them, loss weightings need global loss
values, and the methods call their networks' own methods (``forward_heads``) that a DDP wrapper does
not forward. So the ranks do what DDP does, by hand: identical initial weights (broadcast from rank
0), sharded batches, and one all-reduce of the gradients per step, after the balancer.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.tasks import Task, valid_counts

__all__ = ["Ranks", "LOCAL", "launched", "env_rank", "env_world_size", "setup", "check_config", "check_batches",
           "task_shares", "DISTRIBUTED_METHODS"]

#: methods whose networks all train through :func:`~taskgrouping.engine.fit.fit`, identically on every
#: rank (tests/engine/test_distributed.py checks them against one process; ``oracle`` and ``fixed``
#: train their grouping as ``random`` and ``label_clusters`` do)
DISTRIBUTED_METHODS = ("naive_mtl", "single_task", "random", "oracle", "fixed", "label_clusters", "dmtg",
                       "cross_stitch", "mtan", "interrogate")
#: why the others cannot
_REFUSED = {
    "hoa": "it fans its candidate networks out as cached jobs",
    "esa": "it fans its candidate networks out as cached jobs",
    "optimal": "it fans its candidate networks out as cached jobs",
    "mtg_net": "it fans its candidate networks out as cached jobs",
    "tag": "its lookahead affinity is measured on each rank's slice of the batch",
}


def env_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's rank as ``torchrun`` set it (``RANK``; 0 outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launched() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return env_world_size() > 1


class Ranks:
    """The processes that train one network together (the default process group), or one process.

    Every method is a collective: all ranks call it, in the same order. In one process they are no-ops.
    """

    def __init__(self, world: int = 1, rank: int = 0) -> None:
        self.world, self.rank = int(world), int(rank)

    @classmethod
    def current(cls) -> "Ranks":
        """The default process group, if one with more than one rank is initialised, else :data:`LOCAL`."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_world_size(), dist.get_rank())
        return LOCAL

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results, checkpoints and logs."""
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------------------
    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks, in place; returned."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_rows(self, tensor: Tensor, dim: int = 0) -> tuple[Tensor, int]:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (their sizes along ``dim``
        may differ, the other dimensions may not), and where this rank's part starts."""
        if not self.active:
            return tensor, 0
        import torch.distributed as dist

        size = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
        sizes_t = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes_t, size)
        sizes = [int(s) for s in sizes_t]
        longest = max(sizes)
        padded = tensor
        if tensor.shape[dim] < longest:
            shape = list(tensor.shape)
            shape[dim] = longest - tensor.shape[dim]
            padded = torch.cat([tensor, tensor.new_zeros(shape)], dim)
        padded = padded.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        whole = torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)
        return whole, sum(sizes[:self.rank])

    def all_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled between this run's own processes)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # -- what the trainer synchronises ---------------------------------------------------------------
    def broadcast_tensors(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Copy rank ``src``'s values of ``tensors`` (parameters, buffers) to every rank, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=src)

    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Rank 0's parameters and buffers (or only its buffers) on every rank."""
        tensors = [] if buffers_only else list(module.parameters())
        self.broadcast_tensors(tensors + list(module.buffers()))

    def sync_rng(self, device: torch.device) -> None:
        """Give every rank rank 0's torch RNG state (and the CUDA generator's, on a CUDA device)."""
        if not self.active:
            return
        import torch.distributed as dist

        state = torch.get_rng_state()
        dist.broadcast(state, src=0)
        torch.set_rng_state(state)
        if device.type == "cuda":
            cuda_state = torch.cuda.get_rng_state()
            dist.broadcast(cuda_state, src=0)
            torch.cuda.set_rng_state(cuda_state)

    def sum_grads(self, params: Sequence[Tensor]) -> None:
        """Add up every rank's share of the gradients of ``params`` (one all-reduce per device and
        dtype). A parameter without a gradient on some rank contributes zero there; one without a
        gradient on every rank keeps none (so an optimiser skips it, as in one process)."""
        if not self.active:
            return
        groups: dict[tuple[Any, Any], list[Tensor]] = {}
        for p in params:
            if p.requires_grad:
                groups.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), ps in groups.items():
            present = torch.tensor([p.grad is not None for p in ps], dtype=dtype)
            flat = torch.cat([torch.zeros(p.numel(), dtype=dtype, device=device) if p.grad is None
                              else p.grad.reshape(-1).to(dtype) for p in ps] + [present.to(device)])
            self.all_sum(flat)
            present_anywhere = (flat[-len(ps):] > 0).tolist()
            offset = 0
            for p, keep in zip(ps, present_anywhere):
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p) if keep else None  # views of one buffer, as DDP's
                offset += n


#: one process: every collective is a no-op
LOCAL = Ranks()


def setup(device: str = "auto") -> Ranks:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL for CUDA tensors), once; on
    every rank but 0, standard output goes to ``os.devnull`` (errors still reach standard error).
    Outside torchrun: nothing, :data:`LOCAL`."""
    if not launched():
        return LOCAL
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("torchrun started several processes, but this torch build has no torch.distributed; "
                         "run in one process or install a torch build with distributed support")
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
        atexit.register(_teardown)
        if dist.get_rank() != 0:
            sys.stdout.flush()
            sys.stdout = open(os.devnull, "w")
    return Ranks.current()


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def check_config(config: Mapping[str, Any]) -> None:
    """Under ``torchrun``, refuse (one ``ValueError`` naming it) a method, balancer or setting that
    cannot give every rank the step one process would take."""
    world = env_world_size()
    if world <= 1:
        return
    where = f"torchrun with {world} processes"
    for name in config.get("methods") or []:
        if name not in DISTRIBUTED_METHODS:
            why = _REFUSED.get(name, "it is not known to train its networks in lockstep on every rank")
            raise ValueError(f"{where}: method {name!r} cannot run distributed ({why}); run it in one process "
                             f"or choose among {list(DISTRIBUTED_METHODS)}")
    if "dmtg" in (config.get("methods") or []):
        from taskgrouping.methods.base import available_methods, method_options

        available_methods()
        opts = method_options("dmtg", config.get("dmtg"))
        if float(opts.mates_weight):
            raise ValueError(f"{where}: dmtg.mates_weight={opts.mates_weight!r} measures task gradients on each "
                             "rank's slice of the batch, which the ranks would disagree on; set it to 0 or run in "
                             "one process")
    balancer = (config.get("balancer") or {}).get("name", "ew")
    from taskgrouping.balancing.base import BALANCERS
    from taskgrouping.registry import import_modules

    import_modules("taskgrouping.balancing", ["catalogue"])
    cls = BALANCERS.get(str(balancer).lower())
    if cls is not None and not getattr(cls, "distributed", True):
        raise ValueError(f"{where}: balancer {balancer!r} cannot run distributed; choose another balancer.name "
                         "or run in one process")
    every = (config.get("diagnostics") or {}).get("every", 0) or 0
    if every:
        raise ValueError(f"{where}: diagnostics.every={every!r} measures gradient similarities on each rank's slice "
                         "of the batch only; set diagnostics.every=0 or run in one process")


def check_batches(data: Any, batch_size: int, world: int) -> None:
    """Every global batch of every split must give each of the ``world`` ranks a sample (a rank with
    an empty slice has nothing to run its network on); a ``ValueError`` names the split otherwise."""
    if world <= 1:
        return
    if batch_size < world:
        raise ValueError(f"train.batch_size={batch_size} is the global batch, split over {world} ranks; expected "
                         f"at least {world}")
    for split in ("train", "val", "test"):
        n = len(getattr(data, split))
        last = n % batch_size
        if 0 < last < world:
            raise ValueError(f"the {split} split's {n} samples leave a last batch of {last} for {world} ranks "
                             f"(train.batch_size={batch_size}); choose a batch size whose last batch holds at least "
                             f"{world} samples")


# -- task losses ---------------------------------------------------------------------------------------

def _merge_orders(orders: Sequence[list[int]]) -> list[int]:
    """One order of the union of ``orders`` that keeps each one's order (ties: the lower index first)."""
    after: dict[int, set[int]] = {}
    indegree: dict[int, int] = {}
    for order in orders:
        for i in order:
            after.setdefault(i, set())
            indegree.setdefault(i, 0)
        for a, b in zip(order, order[1:]):
            if b not in after[a]:
                after[a].add(b)
                indegree[b] += 1
    ready = sorted(i for i, d in indegree.items() if d == 0)
    out: list[int] = []
    while ready:
        i = ready.pop(0)
        out.append(i)
        for j in sorted(after[i]):
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
        ready.sort()
    return out


def task_shares(ranks: Ranks, tasks: Sequence[Task], losses: Mapping[str, Tensor],
                targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This rank's task losses -> the losses its balancer gets: each has the value of the task's loss
    on the global batch and the gradient of this rank's share of it (``local sum / global count``).

    The tasks and their order are those one process gets from the objective on the global batch: an
    objective may leave out the tasks without a label in its batch (then a task labelled on another
    rank only gets a zero loss here), and keeps every task on a batch without any label.
    """
    names = [t.name for t in tasks]
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in losses if n not in index]
    if unknown:
        raise ValueError(f"the objective returned losses of tasks {unknown} that are not among the trained tasks "
                         f"{names}")
    n_tasks = len(names)
    some = next(iter(losses.values()))
    device = some.device
    counts = valid_counts(tasks, targets, device)
    info = torch.full((2 * n_tasks + 1,), -1, dtype=torch.int64, device=device)
    info[:n_tasks] = counts
    info[n_tasks:n_tasks + len(losses)] = torch.tensor([index[n] for n in losses], dtype=torch.int64)
    info[2 * n_tasks] = int(bool((counts > 0).any()))
    rows, _ = ranks.gather_rows(info.unsqueeze(0), 0)
    rows = rows.cpu()
    totals = rows[:, :n_tasks].sum(dim=0)
    orders = [[int(i) for i in row[n_tasks:2 * n_tasks] if i >= 0] for row in rows]
    labelled = [o for o, row in zip(orders, rows) if row[2 * n_tasks] > 0] or orders
    wanted = set().union(*map(set, labelled))
    order = next((o for o in labelled if set(o) == wanted), None) or _merge_orders(labelled)
    shares: list[Tensor] = []
    for i in order:
        loss = losses.get(names[i])
        total = int(totals[i])
        if loss is None:
            shares.append(torch.zeros((), device=device))
        else:
            shares.append(loss.reshape(()) * (int(counts[i]) / total if total else 0.0))
    values = ranks.all_sum(torch.stack([s.detach().float() for s in shares]))
    return {names[i]: s + (v.to(s.dtype) - s).detach() for i, s, v in zip(order, shares, values)}
