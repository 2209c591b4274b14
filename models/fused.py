"""The fused decoder block, and :func:`fuse`, the converter that swaps it into a built model.

The way torchtitan applies its float8 and compile converters: build the plain model, then convert
it. ``fuse(model, "mlp,norm,qkv")`` replaces ``model.blocks`` (a :class:`~models.block.Blocks`) with
:class:`FusedBlocks` of :class:`FusedBlock`, moving each block's submodules across, so parameters,
their names and a ``state_dict`` are unchanged. The fusions (:mod:`models.fusion`):

- ``norm``: each residual add and the LayerNorm after it are one quack kernel
  (:func:`models.norm.add_layer_norm`). That needs the add *before* the norm, so a fused block
  returns the residual stream and its MLP output not yet added (x, delta), and the next block adds
  it inside its first LayerNorm; :class:`FusedBlocks` threads the pair and adds the last delta.
- ``mlp``: the exact GELU in the epilogues of the MLP's GEMMs (``MLP(fused=True)``, quack).
- ``qkv``: the attention kernel writes dq, dk and dv into one (..., 3, H, D) gradient
  (:meth:`~models.attention.base.AttentionAdapter.attend_packed`).

Where a kernel cannot take the tensors (a CPU, fp32 compute, nested tensors) each falls back to the
plain torch path, so a fused model on a CPU computes what the plain one does.

Example:
    >>> from models.gpt import GPT, PRESETS
    >>> model = GPT(PRESETS["tiny"], attn="naive")
    >>> keys = list(model.state_dict())
    >>> fuse(model, "qkv") is model, type(model.blocks[0]).__name__, list(model.state_dict()) == keys
    (True, 'FusedBlock', True)
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from models.attention import AttentionAdapter
from models.fusion import resolve_fuse
from models.block import Block, Blocks
from models.norm import add_layer_norm
from packing.batch import Batch


class FusedBlock(Block):
    """A :class:`~models.block.Block` with the fused kernels in ``fusions``; the same parameters.

    ``forward_pair(x, delta, ...)`` takes the residual stream and the previous block's MLP output not
    yet added to it (None for the first block) and returns the same pair, so each residual add sits
    right before the LayerNorm that reads it (one kernel with ``norm``).
    """

    fusions: frozenset[str]

    @classmethod
    def from_block(cls, block: Block, fusions: frozenset[str]) -> FusedBlock:
        """The fused form of ``block``, taking its submodules (and so its parameters) as they are."""
        fused = _rebuilt(cls, block)
        fused.fusions = fusions
        fused.mlp.fused = "mlp" in fusions
        return fused

    def forward(self, x: Tensor, attn: AttentionAdapter, batch: Batch, causal: bool) -> Tensor:
        x, delta = self.forward_pair(x, None, attn, batch, causal)
        return x + delta

    def forward_pair(self, x: Tensor, delta: Tensor | None, attn: AttentionAdapter, batch: Batch,
                     causal: bool) -> tuple[Tensor, Tensor]:
        norm = "norm" in self.fusions
        x, h = add_layer_norm(x, delta, self.ln1, fused=norm)
        x, h = add_layer_norm(x, self.attention(h, attn, batch, causal), self.ln2, fused=norm)
        return x, self.mlp(h)

    def attention(self, h: Tensor, attn: AttentionAdapter, batch: Batch, causal: bool) -> Tensor:
        if "qkv" not in self.fusions:
            return super().attention(h, attn, batch, causal)
        qkv = self.qkv(h).unflatten(-1, (3, self.n_heads, self.head_dim))  # (..., 3, H, Dh)
        return self.proj(attn.attend_packed(qkv, batch, causal=causal).flatten(-2))


class FusedBlocks(Blocks):
    """The fused blocks, threading (x, delta) from one to the next: each block's MLP output is added
    inside the next block's first LayerNorm; the last one is added here."""

    def forward(self, x: Tensor, attn: AttentionAdapter, batch: Batch, causal: bool) -> Tensor:
        delta = None
        for block in self:
            x, delta = block.forward_pair(x, delta, attn, batch, causal)
        return x if delta is None else x + delta


def fuse(model: nn.Module, fusions: str | frozenset[str] = "auto") -> nn.Module:
    """Convert a built :class:`~models.gpt.GPT` to fused kernels in place, and return it.

    ``fusions``: ``"auto"`` (every fusion whose kernels load here), ``"none"``, or names from
    ``mlp``, ``norm``, ``qkv`` (a comma list or a collection); a named fusion whose kernels do not
    load raises a ``ValueError`` with the install line. Convert before ``torch.compile`` and before
    wrapping in DDP or FSDP.
    """
    names = resolve_fuse(fusions)
    blocks = list(model.blocks)
    if any(type(b) not in (Block, FusedBlock) for b in blocks):
        raise TypeError(f"fuse converts a GPT's Block modules; model.blocks holds {sorted({type(b).__name__ for b in blocks})}")
    if not names:
        model.blocks = Blocks(_unfused(b) for b in blocks)
    else:
        model.blocks = FusedBlocks(FusedBlock.from_block(b, names) for b in blocks)
    model.fuse = names
    return model


def _rebuilt(cls: type[Block], block: Block) -> Block:
    """A ``cls`` block holding ``block``'s submodules (its parameters, not copies) and head shape."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.n_heads, new.head_dim = block.n_heads, block.head_dim
    for name, module in block.named_children():
        new.add_module(name, module)
    return new


def _unfused(block: Block) -> Block:
    """A fused block back to a plain one, with its submodules."""
    if type(block) is Block:
        return block
    plain = _rebuilt(Block, block)
    plain.mlp.fused = False
    return plain
