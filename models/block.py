"""The decoder block of the toy GPT, plain: the textbook two residual lines (fused kernels are
:mod:`models.fused`, swapped in by :func:`models.fuse`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn
from torch import Tensor

from models.attention import AttentionAdapter
from models.mlp import MLP
from packing.batch import Batch

if TYPE_CHECKING:
    from models.gpt import GPTConfig


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(LN(x)), then x + MLP(LN(x)), with one qkv projection.

    x: (..., dim) in the batch's token form: (B, L, dim) padded, (T, dim) packed or nested values.
    Fused kernels are not here: :func:`models.fuse` swaps this block for
    :class:`models.fused.FusedBlock`, which has the same parameters.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.ln1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.ln2 = nn.LayerNorm(config.dim)
        self.mlp = MLP(config.dim, 4 * config.dim)

    def forward(self, x: Tensor, attn: AttentionAdapter, batch: Batch, causal: bool) -> Tensor:
        x = x + self.attention(self.ln1(x), attn, batch, causal)
        x = x + self.mlp(self.ln2(x))
        return x

    def attention(self, h: Tensor, attn: AttentionAdapter, batch: Batch, causal: bool) -> Tensor:
        q, k, v = self.qkv(h).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(-3)  # each (..., H, Dh)
        return self.proj(attn(q, k, v, batch, causal=causal).flatten(-2))


class Blocks(nn.ModuleList):
    """The decoder's blocks, run in order: ``forward(x, attn, batch, causal)`` -> x. A module of its
    own so that a converter can swap the whole stack (:class:`models.fused.FusedBlocks` carries
    each block's last residual add into the next block's LayerNorm kernel)."""

    def forward(self, x: Tensor, attn: AttentionAdapter, batch: Batch, causal: bool) -> Tensor:
        for block in self:
            x = block(x, attn, batch, causal)
        return x
