"""``sdpa``: ``F.scaled_dot_product_attention`` on the padded layout."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from models.attention.base import AttentionAdapter
from packing.batch import Batch


class SdpaAttention(AttentionAdapter):
    """``F.scaled_dot_product_attention`` on the padded layout.

    Causal uses ``is_causal=True``: rows are right-padded, so a real query only ever sees earlier
    real keys. Bidirectional masks padding keys with the batch's ``attention_mask``.

    Masked keys get weight 0 but are still multiplied, so a NaN in a padding slot reaches the
    output (0 x NaN; checked on torch 2.13 CPU). Padding slots hold the embedded pad id, which is
    finite; what the pad id *is* does not change real outputs (tested).
    """

    name = "sdpa"
    layouts = frozenset({"padded"})
    reads_padding = True

    @property
    def backend(self) -> str:
        return "torch.sdpa"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        mask = None if causal else batch.attention_mask[:, None, None, :]  # (B, 1, 1, L) over keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
        )  # (B, H, L, D)
        return out.transpose(1, 2)  # (B, L, H, D)
