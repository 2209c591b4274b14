"""FlashAttention-3 (the ``hopper/`` build of flash-attention, module ``flash_attn_interface``) for the
``flash`` adapter, on Hopper (sm90), where it is what production training runs.

FA3 publishes no wheels: it builds from source (``cd flash-attention/hopper && python setup.py
install``; its ``FLASH_ATTENTION_DISABLE_*`` switches cut the build to the kernels this model uses:
head dimension 64, bf16, varlen, forward and backward). Its Python interface already wraps the
kernels as torch custom ops with fake implementations, so ``torch.compile`` keeps them in the graph.

Shapes as in :mod:`models.attention.flash4`: q (T, H, D), k and v (T, H_kv, D) in bf16 or fp16,
cu_seqlens (num_seqs + 1,) int32; out (T, H, D). The packed form takes qkv (T, 3, H, D) and its
backward writes one (T, 3, H, D) gradient (FA3's backward takes dq, dk, dv outputs).

Example (needs FA3 and a Hopper GPU):
    >>> from models.attention.flash3 import fa3_varlen  # doctest: +SKIP
    >>> out = fa3_varlen(q, k, v, cu_seqlens, max_seqlen=1024, causal=True)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention.packed_qkv import packed_qkv_op


def fa3_available() -> bool:
    """Whether FlashAttention-3 imports and the GPU is Hopper (sm90): FA3's kernels are sm90 only."""
    from models.attention.kernels import gpu_loads

    # flash_attn_interface is FA3's top-level module; it loads flash_attn_3._C, its kernels.
    return gpu_loads("flash_attn_interface", max_major=9)


def fa3_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool, *,
               scale: float | None = None, window: int | None = None, softcap: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v within each block of ``cu_seqlens``: (T, H, D). ``scale`` defaults to
    1/sqrt(D); ``window`` and ``softcap`` as in :data:`models.attention.kernels.VARLEN_OPTIONS`."""
    from flash_attn_interface import flash_attn_varlen_func

    from models.attention.kernels import flash_window

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                                  causal=causal, window_size=flash_window(window, causal), softcap=softcap or 0.0)


def _forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> tuple[Tensor, Tensor]:
    from flash_attn_interface import _flash_attn_forward

    out, lse, *_ = _flash_attn_forward(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                       max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                       softmax_scale=q.shape[-1] ** -0.5, causal=causal)
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, dq, dk, dv) -> None:
    from flash_attn_interface import _flash_attn_backward

    # FA3's backward takes dq, dk, dv outputs, the strided slices of one (T, 3, H, D) gradient.
    _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, None, None, max_seqlen, max_seqlen,
                         dq, dk, dv, q.shape[-1] ** -0.5, causal)


# fn(qkv (T, 3, H, D), cu_seqlens, max_seqlen, causal) -> out (T, H, D), whose backward writes one
# (T, 3, H, D) gradient (models.attention.packed_qkv).
fa3_varlen_qkvpacked = packed_qkv_op("fa3_varlen", _forward, _backward)
