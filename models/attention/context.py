"""``context``: the attention of a context-parallel shard (:func:`packing.context.context_attention`).

Not one of the adapters ``attn=`` names: a model given ``attn="auto"`` runs it for every batch that
is a context-parallel shard (``batch.context`` set), and every other adapter refuses such a batch,
whose chunks are not documents.
"""

from __future__ import annotations

from typing import ClassVar


from torch import Tensor

from models.attention.base import AttentionAdapter
from packing.batch import Batch
from packing.context.attention import context_attention
from packing.context.varlen import chunk_kernel


class ContextAttention(AttentionAdapter):
    """Each local chunk attends to its whole document prefix, keys and values all-gathered across
    ``group``, the context-parallel ranks (the default process group when None). On CUDA the chunks
    run in the first varlen kernel that takes their own query and key boundaries and passes its
    check (:mod:`packing.context.varlen`); elsewhere, or where none loads, SDPA with a mask per chunk.

    Example:
        >>> import torch
        >>> from models.attention.sdpa_docs import SdpaDocsAttention
        >>> from packing import get_collator
        >>> from packing.context import batch_blocks, plan_layout, shard
        >>> batch = get_collator("concat")([[5, 6, 7], [8, 9]])
        >>> part = shard(batch, plan_layout(batch_blocks(batch), 1), 0)  # one rank: the whole row
        >>> q = k = v = torch.randn(part.num_slots, 2, 4)  # (T, H, D)
        >>> ref = SdpaDocsAttention("cpu")(q, k, v, batch, causal=True)
        >>> bool(torch.allclose(ContextAttention("cpu")(q, k, v, part, causal=True), ref, atol=1e-6))
        True
    """

    name = "context"
    layouts = frozenset({"packed"})
    reads_context: ClassVar[bool] = True

    def __init__(self, device: torch.device | str, group: Any = None) -> None:
        super().__init__(device)
        self.group = group  # the context-parallel process group; None: the default group
        self.kernel_name: str | None = None  # the varlen kernel of the last call; None: masked SDPA

    @property
    def backend(self) -> str:
        return f"all-gathered keys, {self.kernel_name or 'sdpa with a mask per chunk'}"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        kernel = None
        if q.is_cuda:  # a varlen kernel that takes the chunks' own boundaries, checked at first use
            found = chunk_kernel(q.device, q.dtype, q.shape[-1])
            self.kernel_name, kernel = found if found is not None else (None, None)
        return context_attention(q, k, v, batch, causal=causal, group=self.group, kernel=kernel)
