"""``xformers``: xFormers' ``memory_efficient_attention`` with a ``BlockDiagonalMask`` on the packed layout."""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention.base import AttentionAdapter
from models.kernels import fmha_backend
from packing.batch import Batch
from packing.boundaries import block_lengths


class XformersAttention(AttentionAdapter):
    """xFormers ``memory_efficient_attention`` over the packed row with a ``BlockDiagonalMask``,
    made causal with ``make_causal()``.

    The mask comes from the ``xformers`` collator, built on the host. For a ``concat`` batch
    (no mask) it is built here from the host-side ``seq_lens``, still without a device sync.
    Kernels: xFormers itself where its ops load (its 0.0.35 wheels need torch 2.10), else
    ``mslk`` (``mslk-cuda``, the same kernels packaged for torch 2.11); ``backend`` says which.
    """

    name = "xformers"
    layouts = frozenset({"packed"})
    devices = frozenset({"cuda"})
    consumes_attn_bias = True
    needs = "CUDA and xFormers kernels that load: xformers (its wheels need torch 2.10) or mslk-cuda (torch 2.11)"

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return device.type == "cuda" and fmha_backend() is not None

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(device)
        self._backend, self._fmha = fmha_backend()  # resolved once, as for flash

    @property
    def backend(self) -> str:
        return self._backend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        fmha = self._fmha
        mask_cls = fmha.attn_bias.BlockDiagonalMask
        bias = batch.attn_bias
        if type(bias) is not mask_cls:  # absent (concat batch), or made by the other package
            bias = mask_cls.from_seqlens(block_lengths(batch.seq_lens, batch.num_slots), device=q.device)
        if causal:
            bias = bias.make_causal()
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]  # (T, H, D)
