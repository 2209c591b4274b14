"""The packed-qkv form of a varlen flash kernel as torch custom ops (the toy GPT's ``qkv`` fusion):
FA3's and FA4's, through the private-API wrappers of :mod:`packing.kernels.flash3` and ``flash4``.

q, k and v are the three slices of one (T, 3, H, D) projection. The backward op allocates one
(T, 3, H, D) gradient and has the kernel write dq, dk and dv into its slices, so the backward of
``qkv.unbind`` does not copy three gradients into one (1.6 ms of a 81 ms training step on an H100:
measured on an H100). Both ops are functional from the outside (the backward
returns the gradient it allocated), with fakes and an autograd registration, so ``torch.compile``
keeps them in one graph.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

# forward(q, k, v, cu_seqlens, max_seqlen, causal) -> (out (T, H, D), lse (H, T) fp32)
Forward = Callable[[Tensor, Tensor, Tensor, Tensor, int, bool], tuple[Tensor, Tensor]]
# backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, dq, dk, dv): writes dq, dk, dv
Backward = Callable[..., None]


def packed_qkv_op(name: str, forward: Forward, backward: Backward) -> Callable[[Tensor, Tensor, int, bool], Tensor]:
    """fn(qkv (T, 3, H, D), cu_seqlens, max_seqlen, causal) -> out (T, H, D), registered as the
    custom ops ``varlen_packing::{name}_qkv_fwd`` and ``..._qkv_bwd``."""

    @torch.library.custom_op(f"varlen_packing::{name}_qkv_fwd", mutates_args=(), device_types="cuda")
    def fwd(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> tuple[Tensor, Tensor]:
        q, k, v = qkv.unbind(1)
        return forward(q, k, v, cu_seqlens, max_seqlen, causal)

    @fwd.register_fake
    def _(qkv, cu_seqlens, max_seqlen, causal):
        t, _, h, d = qkv.shape
        return qkv.new_empty((t, h, d)), qkv.new_empty((h, t), dtype=torch.float32)

    @torch.library.custom_op(f"varlen_packing::{name}_qkv_bwd", mutates_args=(), device_types="cuda")
    def bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
            causal: bool) -> Tensor:
        dqkv = torch.empty_like(qkv)
        q, k, v = qkv.unbind(1)
        backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen, causal, *dqkv.unbind(1))
        return dqkv

    @bwd.register_fake
    def _(dout, qkv, out, lse, cu_seqlens, max_seqlen, causal):
        return torch.empty_like(qkv)

    def setup_context(ctx, inputs, output) -> None:
        qkv, cu_seqlens, max_seqlen, causal = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal = max_seqlen, causal

    def grad(ctx, dout: Tensor, dlse: Tensor | None):
        qkv, out, lse, cu_seqlens = ctx.saved_tensors
        return bwd(dout, qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal), None, None, None

    fwd.register_autograd(grad, setup_context=setup_context)

    def run(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
        return fwd(qkv, cu_seqlens, max_seqlen, causal)[0]

    run.op = fwd  # for torch.library.opcheck
    return run


PackedVarlen = Callable[[Tensor, Tensor, int, bool], Tensor]  # fn(qkv, cu_seqlens, max_seqlen, causal) -> out


def packed_kernel(name: str) -> PackedVarlen | None:
    """The packed form of varlen kernel ``name``: fn(qkv (T, 3, H, D), cu_seqlens, max_seqlen, causal)
    -> out (T, H, D), whose backward writes one (T, 3, H, D) gradient; None where it has none."""
    if name == "flash-attn-4":
        return _fa4_packed()
    if name == "flash-attn-3":
        return _fa3_packed()
    return None


@functools.cache  # each custom op is registered once
def _fa4_packed() -> PackedVarlen:
    from packing.kernels.flash4 import _flash_bwd, _flash_fwd

    def forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> tuple[Tensor, Tensor]:
        return _flash_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                          max_seqlen_k=max_seqlen, softmax_scale=q.shape[-1] ** -0.5, causal=causal)

    def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, dq, dk, dv) -> None:
        # FA4's backward takes dq, dk, dv outputs, the strided slices of one (T, 3, H, D) gradient.
        _flash_bwd(q, k, v, out, dout, lse, None, causal, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                   max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, dq=dq, dk=dk, dv=dv)

    return packed_qkv_op("fa4_varlen", forward, backward)


@functools.cache
def _fa3_packed() -> PackedVarlen:
    from packing.kernels.flash3 import _interface

    def forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> tuple[Tensor, Tensor]:
        out, lse, *_ = _interface()._flash_attn_forward(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                          max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                                          softmax_scale=q.shape[-1] ** -0.5, causal=causal)
        return out, lse

    def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, dq, dk, dv) -> None:
        # FA3's backward takes dq, dk, dv outputs, the strided slices of one (T, 3, H, D) gradient.
        _interface()._flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, None, None, max_seqlen,
                                          max_seqlen, dq, dk, dv, q.shape[-1] ** -0.5, causal)

    return packed_qkv_op("fa3_varlen", forward, backward)
