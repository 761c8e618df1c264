"""A small Vision Transformer (Dosovitskiy et al. 2021) returning its token sequence (L, D).

Patch embedding (a ``patch_size``-strided convolution plus learned position embeddings; no class
token, since heads mean-pool the tokens), then ``depth`` pre-norm transformer blocks

    x = x + Attn(LN(x)),    x = x + FFN(LN(x)),

then a final LayerNorm. Attention and FFN are built from explicit ``nn.Linear`` layers — ``q``,
``k``, ``v``, ``out`` in :class:`MultiHeadSelfAttention` and ``fc1``, ``fc2`` in
:class:`FeedForward` — because InterroGate gates the channels of exactly these projections
(``nn.MultiheadAttention`` hides them in one fused weight).

Children (what ``shared_blocks`` counts): 0 = patch embedding, 1..depth = the transformer blocks,
depth + 1 = the final LayerNorm. ``shared_blocks = 1 + j`` shares the embedding and the first ``j``
transformer blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskgrouping.models.backbones import register_backbone
from taskgrouping.models.resnet import image_channels, positive_int

LN_EPS = 1e-6  # as in the original ViT


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``dim``-dim tokens, plus learned positions."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        n_tokens = (image_size[0] // patch_size) * (image_size[1] // patch_size)
        self.position = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class MultiHeadSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V per head (Vaswani et al. 2017, Eq. 1) with separate
    q, k, v and output projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape

        def split(t: Tensor) -> Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """fc2(GELU(fc1(x))), hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + ffn(norm2(.))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = FeedForward(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


@register_backbone("vit")
def vit(input_shape: tuple[int, ...], patch_size: int = 4, dim: int = 192, depth: int = 6, heads: int = 3,
        mlp_ratio: float = 4.0) -> nn.Sequential:
    """Small ViT (module docstring) returning tokens (L, D), L = (H / patch_size) * (W / patch_size).

    Defaults are ViT-Ti's width (dim 192, 3 heads, MLP x4) at half its depth, with 4x4 patches for
    32x32 inputs (64 tokens).
    """
    c = image_channels("vit", input_shape)
    for option, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads)):
        positive_int("vit", option, value)
    h, w = int(input_shape[1]), int(input_shape[2])
    if h % patch_size or w % patch_size:
        raise ValueError(f"backbone 'vit': input H, W must be multiples of patch_size={patch_size}; "
                         f"got input shape {tuple(input_shape)}")
    if dim % heads:
        raise ValueError(f"backbone 'vit': dim={dim} must be divisible by heads={heads}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        raise ValueError(f"backbone 'vit': option mlp_ratio must be a positive number, got {mlp_ratio!r}")
    hidden = max(1, int(round(dim * mlp_ratio)))
    net = nn.Sequential(PatchEmbedding(c, (h, w), patch_size, dim),
                        *(TransformerBlock(dim, heads, hidden) for _ in range(depth)),
                        nn.LayerNorm(dim, eps=LN_EPS))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net
