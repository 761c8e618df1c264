"""Several networks of one architecture run as one batched call.

DMTG's K branches, single-task learning's N networks and InterroGate's T + 1 streams are copies of
one backbone. Run one after another, a step pays every operator's fixed cost K times, and on a GPU
the small kernels leave the device mostly idle. :func:`run_stacked` instead stacks the copies'
weights along a leading branch axis (``torch.stack``, so each copy keeps its own parameters, state
dict and gradients) and evaluates the architecture once under ``torch.func.vmap``: a convolution
becomes one grouped convolution, a linear layer one batched matrix product.

The copies stay ordinary modules, so checkpoints, pruning and optimisers see the same tensors in
either mode; :func:`run_branches` is the one switch between the stacked call and the plain loop.
Batch-norm running statistics are updated on the stacked buffers and written back to each copy.
With dropout active the two modes draw different masks (same distribution); everything else
agrees to float rounding (the stacked kernels sum in another order).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["BRANCH_MODES", "BranchMode", "Call", "run_branches", "run_stacked", "stacked_call", "stackable",
           "same_architecture", "resolve_branch_mode"]

BranchMode = Literal["loop", "stacked"]
#: Accepted values of ``train.branches``: ``auto`` stacks on CUDA and loops on CPU.
BRANCH_MODES = ("auto", "loop", "stacked")

Call = Callable[[nn.Module, Tensor], Tensor]


def _call_forward(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


class _Bound(nn.Module):
    """``fn(module, x)`` as a module's forward, so ``functional_call`` can swap the weights ``fn`` uses."""

    def __init__(self, module: nn.Module, fn: Call) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.module, x)


def _signature(module: nn.Module) -> tuple:
    return (tuple((n, type(m)) for n, m in module.named_modules()),
            tuple((n, p.shape, p.dtype, p.requires_grad) for n, p in module.named_parameters()),
            tuple((n, b.shape, b.dtype) for n, b in module.named_buffers()))


def same_architecture(modules: Sequence[nn.Module]) -> bool:
    """Whether every module has the same submodule types, parameter and buffer names, shapes and dtypes."""
    first = _signature(modules[0])
    return all(_signature(m) == first for m in modules[1:])


Inputs = Tensor | Sequence[Tensor] | Sequence[tuple[Tensor, ...]]


def stacked_call(modules: Sequence[nn.Module], inputs: Tensor | tuple[Tensor, ...], fn: Call | None = None,
                 in_dims: int | None | tuple[int | None, ...] = 0) -> Tensor:
    """``fn(module_k, input_k)`` for every module as one vmapped call, the outputs stacked along a new
    leading axis. ``inputs`` holds every module's input stacked along dim 0 (``in_dims=0``), or one input
    that every module reads (``None``); a tuple of tensors takes a tuple of those (one per tensor).

    The modules must share one architecture (:func:`same_architecture`). Gradients reach every
    module's own parameters; in training mode their batch-norm buffers are updated as the loop would.
    """
    fn = fn or _call_forward
    names = [n for n, _ in modules[0].named_parameters()]
    buffer_names = [n for n, _ in modules[0].named_buffers()]
    per_module = [dict(m.named_parameters()) for m in modules]
    params = {f"module.{n}": torch.stack([p[n] for p in per_module]) for n in names}
    own_buffers = [dict(m.named_buffers()) for m in modules]
    buffers = {f"module.{n}": torch.stack([b[n] for b in own_buffers]) for n in buffer_names}
    template = _Bound(modules[0], fn)

    def one(p: dict, b: dict, xi: Tensor) -> Tensor:
        return functional_call(template, (p, b), (xi,))

    # CUDA's fused attention kernels fail in the backward pass under vmap ("LSE is not correctly aligned");
    # the math kernel (matrix products and a softmax) batches like any other operator
    fused_ok = next(iter(params.values())).device.type != "cuda" if params else True
    with nullcontext() if fused_ok else sdpa_kernel(SDPBackend.MATH):
        out = vmap(one, in_dims=(0, 0, in_dims), randomness="different")(params, buffers, inputs)
    if buffers and any(m.training for m in modules):
        with torch.no_grad():  # running statistics were updated in place on the stacked copies
            for k, own in enumerate(own_buffers):
                for n in buffer_names:
                    own[n].copy_(buffers[f"module.{n}"][k])
    return out


def run_stacked(modules: Sequence[nn.Module], x: Inputs, fn: Call | None = None) -> list[Tensor]:
    """``[fn(m, x) for m in modules]``, or ``fn(m, x_k)`` with one input (a tensor or a tuple of tensors)
    per module, as one vmapped call (:func:`stacked_call`); ``fn`` defaults to calling the module."""
    fn = fn or _call_forward
    if len(modules) == 1:
        return [fn(modules[0], x if isinstance(x, Tensor) else x[0])]
    if isinstance(x, Tensor):
        return list(stacked_call(modules, x, fn, None).unbind(0))
    if isinstance(x[0], Tensor):
        inputs: Tensor | tuple[Tensor, ...] = torch.stack(list(x))
    else:
        inputs = tuple(torch.stack(list(parts)) for parts in zip(*x))
    return list(stacked_call(modules, inputs, fn, 0).unbind(0))


def stackable(modules: Sequence[nn.Module]) -> bool:
    """False under CUDA autocast for modules with batch norm: vmap's batch-norm rule then rejects float32
    running statistics beside a bfloat16 input (torch 2.11 on an H200), so those calls run as the loop."""
    return not (torch.is_autocast_enabled("cuda")
                and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules[0].modules()))


def run_branches(modules: Sequence[nn.Module], x: Inputs, mode: BranchMode, fn: Call | None = None) -> list[Tensor]:
    """``fn(module, input)`` for every module (see :func:`run_stacked`): one vmapped call (``stacked``) or a
    plain loop (``loop``, and ``stacked`` where :func:`stackable` says it cannot)."""
    if mode == "stacked" and len(modules) > 1 and stackable(modules):
        return run_stacked(modules, x, fn)
    fn = fn or _call_forward
    inputs = [x] * len(modules) if isinstance(x, Tensor) else list(x)
    return [fn(m, xi) for m, xi in zip(modules, inputs)]


def resolve_branch_mode(mode: str, device: torch.device) -> BranchMode:
    """``auto``: stacked on CUDA (launch-bound, where one call pays), the loop on CPU (FLOP-bound; see
    benchmarks/results/branches.md for both measured side by side)."""
    if mode not in BRANCH_MODES:
        raise ValueError(f"train.branches must be one of {list(BRANCH_MODES)}, got {mode!r}")
    if mode == "auto":
        return "stacked" if device.type == "cuda" else "loop"
    return mode  # type: ignore[return-value]
