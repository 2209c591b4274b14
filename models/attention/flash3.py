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


def fa3_available() -> bool:
    """Whether FlashAttention-3 imports and the GPU is Hopper (sm90): FA3's kernels are sm90 only."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        return False
    try:
        import flash_attn_interface

        flash_attn_interface.flash_attn_varlen_func  # noqa: B018 - FA3's interface, not another package's
    except (ImportError, AttributeError):
        return False
    return True


def fa3_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
    """softmax(q kᵀ / sqrt(D)) v within each block of ``cu_seqlens``: (T, H, D)."""
    from flash_attn_interface import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)


def _forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> tuple[Tensor, Tensor]:
    from flash_attn_interface import _flash_attn_forward

    out, lse, *_ = _flash_attn_forward(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                       max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                       softmax_scale=q.shape[-1] ** -0.5, causal=causal)
    return out, lse


@torch.library.custom_op("varlen_packing::fa3_varlen_qkv_fwd", mutates_args=(), device_types="cuda")
def _qkv_fwd(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> tuple[Tensor, Tensor]:
    q, k, v = qkv.unbind(1)
    return _forward(q, k, v, cu_seqlens, max_seqlen, causal)


@_qkv_fwd.register_fake
def _(qkv, cu_seqlens, max_seqlen, causal):
    t, _, h, d = qkv.shape
    # FA3's varlen lse is (H, T) fp32.
    return qkv.new_empty((t, h, d)), qkv.new_empty((h, t), dtype=torch.float32)


@torch.library.custom_op("varlen_packing::fa3_varlen_qkv_bwd", mutates_args=(), device_types="cuda")
def _qkv_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool
) -> Tensor:
    from flash_attn_interface import _flash_attn_backward

    dqkv = torch.empty_like(qkv)
    q, k, v = qkv.unbind(1)
    dq, dk, dv = dqkv.unbind(1)
    _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, None, None, max_seqlen, max_seqlen,
                         dq, dk, dv, q.shape[-1] ** -0.5, causal)
    return dqkv


@_qkv_bwd.register_fake
def _(dout, qkv, out, lse, cu_seqlens, max_seqlen, causal):
    return torch.empty_like(qkv)


def _qkv_setup_context(ctx, inputs, output) -> None:
    qkv, cu_seqlens, max_seqlen, causal = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal = max_seqlen, causal


def _qkv_backward(ctx, dout: Tensor, dlse: Tensor | None):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    return _qkv_bwd(dout, qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal), None, None, None


_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def fa3_varlen_qkvpacked(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
    """:func:`fa3_varlen` on qkv (T, 3, H, D): out (T, H, D), and one (T, 3, H, D) gradient."""
    return _qkv_fwd(qkv, cu_seqlens, max_seqlen, causal)[0]
