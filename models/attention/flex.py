"""``flex``: FlexAttention with a document ``BlockMask`` on the packed layout."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from models.attention.base import AttentionAdapter
from models.attention.block_mask import document_block_mask
from packing.batch import Batch


class FlexDocumentAttention(AttentionAdapter):
    """FlexAttention over the packed row with a document (plus causal) ``BlockMask``.

    The mask is built once per batch on the host from ``seq_lens`` (see :mod:`models.attention.block_mask`:
    no T x T tensor) and shared by every layer. On CUDA, ``flex_attention`` runs compiled; pad the
    row to a fixed ``total_tokens`` or a multiple to keep shapes static. On CPU it runs torch's
    unfused eager reference (``backend`` "flex-eager"), forward only: torch has no CPU backward.

    It is slower than ``flash`` on the seed workload; the gap is the flex kernels themselves, mostly
    in partial tiles where the mask is evaluated per element, not the host-side mask build
    (measured: benchmarks/results/README.md).
    """

    name = "flex"
    layouts = frozenset({"packed"})
    preferred_on = frozenset({"cuda"})
    reads_padding = True  # the tail shares partial blocks with real tokens; the mask gives it weight 0

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(device)
        self._mask_for: tuple[Batch, bool] | None = None
        self._mask = None
        self._flex = torch.compile(flex_attention) if self.device.type == "cuda" else flex_attention

    @property
    def backend(self) -> str:
        return "flex-compiled" if self.device.type == "cuda" else "flex-eager"

    def unsupported(self, *, causal: bool, grad: bool) -> str | None:
        if grad and self.device.type == "cpu":
            return "torch's FlexAttention has no backward on CPU; train with attn='naive' on CPU, or run on CUDA"
        return None

    def block_mask(self, batch: Batch, causal: bool):
        """The batch's BlockMask, built on its first layer and reused by the rest."""
        if self._mask_for is None or self._mask_for[0] is not batch or self._mask_for[1] != causal:
            self._mask = document_block_mask(batch.seq_lens, batch.num_slots, causal=causal, device=self.device)
            self._mask_for = (batch, causal)
        return self._mask

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        mask = self.block_mask(batch, causal)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
        if self.device.type == "cpu":
            with warnings.catch_warnings():
                # Eager flex warns that it is unfused; on CPU that is the documented reference path.
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                out = self._flex(q, k, v, block_mask=mask)
        else:
            out = self._flex(q, k, v, block_mask=mask)
        return out[0].transpose(0, 1)  # (T, H, D)
