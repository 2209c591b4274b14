"""The residual add and the LayerNorm after it, as one quack kernel where it runs (fusion ``norm``)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from models.fusion import half_compute_dtype


def add_layer_norm(x: Tensor, delta: Tensor | None, norm: nn.LayerNorm, *, fused: bool = False) -> tuple[Tensor, Tensor]:
    """(x + delta, norm(x + delta)); with ``delta=None``, (x, norm(x)).

    x: the residual stream (..., dim), fp32 under autocast; delta: a sub-layer's output (..., dim).
    The torch path is exactly ``x = x + delta; norm(x)``. With ``fused=True`` and tensors quack can
    take, one kernel reads x and delta and writes the new stream (in x's dtype) and the normalized
    output (in the autocast dtype, which the next GEMM reads), and one backward kernel makes the
    LayerNorm gradient plus the stream's gradient, and the weight and bias gradients.

    Example:
        >>> import torch
        >>> x, delta, ln = torch.randn(4, 8), torch.randn(4, 8), nn.LayerNorm(8)
        >>> s, h = add_layer_norm(x, delta, ln)
        >>> torch.equal(s, x + delta), torch.equal(h, ln(x + delta))
        (True, True)
    """
    if delta is None:
        return x, norm(x)
    if fused and x.dim() == delta.dim() and norm.weight is not None and norm.bias is not None:
        dtype = half_compute_dtype(delta)
        if dtype is not None:
            shape = x.shape
            out, stream = _AddLayerNorm.apply(
                delta.reshape(-1, shape[-1]), x.reshape(-1, shape[-1]), norm.weight, norm.bias, norm.eps, dtype
            )
            return stream.reshape(shape), out.reshape(shape)
    x = x + delta
    return x, norm(x)


class _AddLayerNorm(torch.autograd.Function):
    """delta, x (M, N) -> (LayerNorm(x + delta) (M, N) in ``out_dtype``, x + delta (M, N) in x's dtype)."""

    @staticmethod
    def forward(ctx, delta: Tensor, x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype):
        from quack.rmsnorm import _rmsnorm_fwd

        delta, x = delta.contiguous(), x.contiguous()
        rows = x.shape[0]
        out = torch.empty_like(delta, dtype=out_dtype)
        stream = torch.empty_like(x)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        _rmsnorm_fwd(delta, weight, out, bias, rstd, mean, x, stream, eps, True)
        ctx.save_for_backward(stream, weight, rstd, mean)
        ctx.delta_dtype = delta.dtype
        return out, stream

    @staticmethod
    def backward(ctx, dout: Tensor, dstream: Tensor):
        from quack.rmsnorm import _rmsnorm_bwd
        from quack.rmsnorm_config import get_sm_count

        stream, weight, rstd, mean = ctx.saved_tensors
        n = stream.shape[-1]
        sm_count = get_sm_count(n, stream.device)
        # One kernel: d(x + delta) = LayerNorm'(dout) + dstream, written twice, in the stream's
        # dtype for x and in delta's dtype for the sub-layer's GEMM; weight and bias gradients as
        # fp32 partial sums per CTA.
        ddelta = torch.empty_like(stream, dtype=ctx.delta_dtype)
        dx = torch.empty_like(stream)
        dw_partial = torch.empty(sm_count, n, device=stream.device, dtype=torch.float32)
        db_partial = torch.empty(sm_count, n, device=stream.device, dtype=torch.float32)
        _rmsnorm_bwd(stream, weight, dout.contiguous(), rstd, ddelta, dw_partial, db_partial, dstream.contiguous(), dx,
                     sm_count, mean=mean, is_layernorm=True)
        dw = dw_partial.sum(0).to(weight.dtype)
        db = db_partial.sum(0).to(weight.dtype)
        return ddelta, dx, dw, db, None, None
