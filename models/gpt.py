"""The seed article's toy GPT decoder, fed by a :class:`~packing.batch.Batch` in any layout."""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.attention import AttentionAdapter, get_adapter
from models.attention.context import ContextAttention
from models.fusion import resolve_fuse
from models.block import Block, Blocks
from models.fused import fuse as apply_fuse
from packing.batch import Batch


@dataclass(frozen=True)
class GPTConfig:
    """Model size. ``max_len`` bounds positions: the learned position table has ``max_len`` rows."""

    vocab_size: int = 1024
    max_len: int = 1024
    n_layers: int = 24
    dim: int = 1024
    n_heads: int = 16

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")


PRESETS: dict[str, GPTConfig] = {
    # The seed article's model: 24 layers, dim 1024, 16 heads, vocab 1024, max_len 1024.
    "seed": GPTConfig(vocab_size=1024, max_len=1024, n_layers=24, dim=1024, n_heads=16),
    # The seed model at long context, where attention dominates: 4 documents a step, lengths up to 16,383.
    "long": GPTConfig(vocab_size=1024, max_len=16384, n_layers=24, dim=1024, n_heads=16),
    # Runs a train step on 32 documents in well under a second on a 2-core CPU.
    "tiny": GPTConfig(vocab_size=1024, max_len=256, n_layers=2, dim=64, n_heads=4),
}


class GPT(nn.Module):
    """Decoder-only transformer with learned token and position embeddings.

    Args:
        config: the model size (see :data:`PRESETS`).
        attn: the attention adapter's name, or ``"auto"`` for the fastest one that takes the
            batch's layout on its device. It is resolved once per (layout, device).
        fuse: sugar for :func:`models.fuse` after construction: ``"none"`` (default), ``"auto"``
            (every fusion whose kernels load here), or names from ``mlp``, ``norm``, ``qkv``. Each
            is the same math as the plain model, with the same parameters.
        context_group: the process group of the context-parallel ranks, for batches that are
            shards of a row (:mod:`packing.context`; ``"auto"`` attends them); None: the default
            group.

    ``forward(batch, causal=True)`` returns logits in the batch's layout: (B, L, vocab) padded,
    (1, T, vocab) packed, or a jagged (B, j, vocab) NestedTensor. Positions come from
    ``batch.position_ids``, so packed sequences each start at position 0.

    Example:
        >>> from packing import get_collator
        >>> model = GPT(PRESETS["tiny"], attn="naive")
        >>> batch = get_collator("concat")([[5, 6, 7], [8, 9]])
        >>> model(batch).shape
        torch.Size([1, 5, 1024])
    """

    def __init__(self, config: GPTConfig, *, attn: str = "auto", fuse: str | frozenset[str] = "none",
                 context_group: Any = None) -> None:
        super().__init__()
        self.config = config
        self.attn = attn
        self.context_group = context_group  # the context-parallel ranks of a shard (None: the default group)
        self.fuse: frozenset[str] = frozenset()  # what models.fuse has applied
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.blocks = Blocks(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._adapters: dict[tuple[str, str], AttentionAdapter] = {}
        if resolve_fuse(fuse):
            apply_fuse(self, fuse)

    @torch.compiler.disable
    def adapter(self, layout: str, device: torch.device | str, attn_bias: bool = False,
                context: bool = False) -> AttentionAdapter:
        """The attention adapter used for ``layout`` on ``device`` (``attn_bias``: whether the
        batches carry an xFormers mask, which ``"auto"`` hands to the adapter that consumes it;
        ``context``: whether they are context-parallel shards, which ``"auto"`` attends with
        :class:`~models.attention.context.ContextAttention`).

        Outside ``torch.compile`` (a graph break at the start of ``forward``): traced, the first
        call's cache insert would be a guard, and the second step would recompile the model.
        """
        key = (layout, torch.device(device).type, attn_bias, context)
        if key not in self._adapters:
            if context and self.attn != "auto":
                raise ValueError(f"attn={self.attn!r} cannot attend a context-parallel shard (its chunks are parts of "
                                 "documents whose keys sit on other ranks); build the model with attn='auto', which "
                                 "runs the context-parallel attention for shards")
            adapter = ContextAttention(device, self.context_group) if context else get_adapter(self.attn, layout, device, attn_bias=attn_bias)
            adapter.bind_head_dim(self.config.dim // self.config.n_heads)
            self._adapters[key] = adapter
        return self._adapters[key]

    def adapter_for(self, batch: Batch, device: torch.device | str | None = None) -> AttentionAdapter:
        """The adapter this model uses for ``batch`` on ``device`` (default: the batch's device)."""
        device = batch.input_ids.device if device is None else device
        return self.adapter(batch.layout, device, batch.attn_bias is not None, batch.context is not None)

    def check(self, batch: Batch) -> None:
        """Raise if the batch does not fit the model: token ids below ``vocab_size``, sequences no
        longer than ``max_len``. It reads host ints only, so it never syncs with the device.

        ``forward`` calls it in eager mode only. Traced by ``torch.compile``, every batch's
        ``max_seqlen`` and ``max_token_id`` would become guards, and under ``dynamic=False`` each new
        value would recompile the model (seen on an H200: the recompile limit of 8 was hit within the
        warm-up, and the rest ran eager). A compiled training loop keeps the clear errors by calling
        ``model.check(batch)`` itself, on the host.
        """
        if not isinstance(batch, Batch):
            raise TypeError(f"GPT takes a packing.Batch, got {type(batch).__name__}; build one with a collator")
        # Host ints, so these checks never sync with the device.
        if batch.max_token_id >= self.config.vocab_size:
            raise ValueError(
                f"batch holds token id {batch.max_token_id} >= vocab_size {self.config.vocab_size}; "
                "use a tokenizer that fits the model or raise vocab_size"
            )
        # A context-parallel shard's sequences are chunks: its positions run as far as the row's documents.
        longest = batch.max_seqlen if batch.context is None else max(batch.context.layout.block_lens)
        if longest > self.config.max_len:
            raise ValueError(
                f"batch holds a sequence of length {longest} > max_len {self.config.max_len}; "
                "split long documents or raise max_len"
            )

    def forward(self, batch: Batch, *, causal: bool = True) -> Tensor:
        if not torch.compiler.is_compiling():
            self.check(batch)
        # The adapter's arguments, read here: traced through adapter_for(batch), dynamo guarded on
        # len(batch.seq_lens) and recompiled for every document count (torch 2.11, H100).
        attn = self.adapter(batch.layout, batch.input_ids.device, batch.attn_bias is not None, batch.context is not None)
        ids, pos = batch.unwrap(batch.input_ids), batch.unwrap(batch.position_ids)
        x = self.tok_emb(ids) + self.pos_emb(pos)  # (B, L, dim) or (T, dim)
        x = self.blocks(x, attn, batch, causal)
        return batch.wrap(self.head(self.ln_f(x)))


def lm_loss(logits: Tensor, batch: Batch, *, normalizer: int | Tensor | None = None) -> Tensor:
    """Cross-entropy summed over the batch's real target tokens, divided by ``normalizer``.

    By default the normalizer is the host int ``batch.num_targets``: the mean over this batch's real
    targets, with no device sync. Padding and positions whose label is ``ignore_index`` contribute
    nothing. A batch with no targets (only length-1 documents) gives a loss of 0 and a zero
    gradient; where nothing else gives the loss a count (a host normalizer of 0) it warns, since a
    step on it trains nothing. Not an error: a sampler's last pack can hold only such documents, and
    one rare batch should not end a run. As one micro-batch of several, under a global
    ``normalizer`` > 0, it adds nothing, as it should, and says nothing.

    For a global mean across gradient-accumulation steps and ranks, pass the total target count of
    all of them (see :func:`packing.distributed.global_num_targets`): then every token weighs the
    same, however the documents fell into batches.

    logits: in the batch's layout, (..., vocab); returns a scalar.
    """
    flat_logits = batch.unwrap(logits).flatten(0, -2)  # (slots, vocab)
    flat_labels = batch.unwrap(batch.labels).flatten()  # (slots,)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=batch.ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = batch.num_targets
    if isinstance(normalizer, Tensor):  # a device count (global_num_targets): no host read to check it
        return total / normalizer.clamp(min=1)
    if normalizer < 1:
        warnings.warn(
            f"no target tokens to average over (normalizer {normalizer}): all {len(batch.seq_lens)} documents of this "
            "batch are one token long, so its loss is 0.0 and the step trains nothing; drop documents shorter than 2 "
            "tokens, or pass normalizer= the target count of all the micro-batches of the step",
            stacklevel=2,
        )
        return total  # 0, with a zero gradient
    return total / normalizer
