"""``sdpa_nested``: SDPA on jagged NestedTensors, no padding anywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.base import AttentionAdapter
from packing.batch import Batch


class SdpaNestedAttention(AttentionAdapter):
    """SDPA on jagged NestedTensors: (B, H, j, D) views over the values, no padding anywhere.

    The views reuse the batch's offsets and host-side min/max seqlen, so SDPA never reads the
    lengths back from the device. On CPU, torch has only a bidirectional kernel for NestedTensors,
    so causal there raises a ``ValueError`` (``auto`` picks the naive reference on CPU instead).
    """

    name = "sdpa_nested"
    layouts = frozenset({"nested"})
    preferred_on = frozenset({"cuda"})

    @property
    def backend(self) -> str:
        return "torch.sdpa-nested"

    def unsupported(self, *, causal: bool, grad: bool) -> str | None:
        if causal and self.device.type == "cpu":
            return (
                "torch has no causal SDPA kernel for NestedTensors on CPU (bidirectional only); "
                "use attn='naive' for causal on CPU, or run on CUDA"
            )
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        offsets = batch.input_ids.offsets()
        lo, hi = min(batch.seq_lens), batch.max_seqlen

        def nested(t: Tensor) -> Tensor:
            # NestedTensor SDPA needs contiguous values; q/k/v are strided views of the fused qkv.
            t = torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets, min_seqlen=lo, max_seqlen=hi)
            return t.transpose(1, 2)  # (B, H, j, D)

        out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), is_causal=causal)
        return out.transpose(1, 2).values()  # (N, H, D)
