"""The MTG-Net meta-learner (Song et al., NeurIPS 2022, Sec. 4.1): task combination mask -> per-task
gain of every task in it, by self-attention among the tasks present only, so that a task's predicted
gain depends on exactly the combination it is trained in. An ensemble is held as one batched module."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MetaLearner"]


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
