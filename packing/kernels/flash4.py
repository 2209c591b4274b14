"""FlashAttention-4's varlen kernel as a torch custom op, so ``torch.compile`` keeps it in the graph.

Traced as plain Python, FA4's CuTe-DSL launcher breaks the graph and recompiles on every layer.
Called through ``torch.compiler.disable`` it still breaks the graph in every layer, and dynamo
recompiles. As a custom op with a fake (shape-only) implementation and an autograd registration,
dynamo and AOTAutograd see one opaque node for the forward and one for the backward, and the
compiled step is one graph.

Shapes, for T packed tokens, H query heads, H_kv key/value heads (H a multiple of H_kv: grouped-query
attention runs in the kernel, no repeat) and head dimension D:

- q (T, H, D), k and v (T, H_kv, D), bf16 or fp16, on a Hopper-or-newer GPU;
- cu_seqlens (num_seqs + 1,) int32, non-decreasing from 0 to at most T; an empty sequence is allowed;
- returns out (T, H, D); the forward op also returns lse (H, T) fp32 for the backward.

Example (needs FA4 and a Hopper GPU):
    >>> from packing.kernels.flash4 import fa4_varlen  # doctest: +SKIP
    >>> out = fa4_varlen(q, k, v, cu_seqlens, max_seqlen=1024, causal=True)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from packing.kernels.common import VARLEN_MIN_HEAD_DIM, check_version, gpu_loads


def fa4_available() -> bool:
    """Whether FlashAttention-4 imports, is a version whose private API is the one wrapped here
    (:data:`packing.kernels.common.VERIFIED`), and the GPU is Hopper (sm90) or newer."""
    if not gpu_loads("flash_attn.cute.interface"):
        return False
    try:
        check_version("flash-attn-4")
    except ImportError:
        return False
    return True


# FA4's private API: each function called in exactly one place, here, after the version check.
def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """``flash_attn.cute.interface._flash_attn_fwd`` with varlen keywords; returns (out, lse)."""
    check_version("flash-attn-4")
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, return_lse=True, **kwargs)
    return out, lse


def _flash_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float | None,
               causal: bool, **kwargs) -> tuple[Tensor, ...]:
    """``flash_attn.cute.interface._flash_attn_bwd``: (dq, dk, dv[, dsink]); writes into given dq, dk, dv."""
    check_version("flash-attn-4")
    from flash_attn.cute.interface import _flash_attn_bwd

    return _flash_attn_bwd(q, k, v, out, dout, lse, scale, causal, **kwargs)


def _window(window_left: int, causal: bool) -> dict:
    """FA4's window keywords: None where unbounded (window_left -1), right 0 for a causal window."""
    if window_left < 0:
        return {}
    return {"window_size_left": window_left, "window_size_right": 0 if causal else window_left}


def _scale(q: Tensor, scale: float) -> float:
    return scale if scale > 0 else q.shape[-1] ** -0.5  # 0.0 stands for the default 1/sqrt(D)


# The options are plain numbers with neutral values (scale 0.0: 1/sqrt(D); window_left -1: none;
# softcap 0.0: none), so a layer's options are constants of the compiled graph.
# sinks: gpt-oss' per-head learnable sink logits (H,), FA4's learnable_sink; None for none.
@torch.library.custom_op("varlen_packing::fa4_varlen_fwd", mutates_args=(), device_types="cuda")
def _fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
         max_seqlen_k: int, causal: bool, scale: float = 0.0, window_left: int = -1, softcap: float = 0.0,
         sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return _flash_fwd(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k, softmax_scale=_scale(q, scale), causal=causal, softcap=softcap or None,
                      learnable_sink=sinks, **_window(window_left, causal))


@_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale=0.0, window_left=-1, softcap=0.0,
      sinks=None):
    # Contiguous out and lse (H, T) fp32, as FA4 allocates them; the backward's dq, dk, dv are
    # empty_like(q, k, v) in FA4, strides included.
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("varlen_packing::fa4_varlen_bwd", mutates_args=(), device_types="cuda")
def _bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float = 0.0, window_left: int = -1, softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _flash_bwd(q, k, v, out, dout.contiguous(), lse, _scale(q, scale), causal, softcap=softcap,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k, learnable_sink=sinks, **_window(window_left, causal))
    # With a sink FA4 also returns its gradient (H,); without, an empty one keeps the op's schema fixed.
    return (*grads, q.new_empty(0)) if sinks is None else tuple(grads)


@_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale=0.0,
      window_left=-1, softcap=0.0, sinks=None):
    dsink = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsink


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, *options = inputs
    out, lse = output
    sinks = options[3] if len(options) > 3 else None
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
    ctx.max_seqlen, ctx.causal, ctx.options, ctx.num_inputs = (max_q, max_k), causal, options[:3], len(inputs)


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv, dsink = _bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlen, ctx.causal, *ctx.options, sinks)
    grads = [dq, dk, dv] + [None] * (ctx.num_inputs - 3)  # one per input: the rest are not differentiable
    if sinks is not None:
        grads[11] = dsink
    return tuple(grads)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def fa4_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool, *,
               scale: float | None = None, window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v within each block of ``cu_seqlens``: (T, H, D), see the module docstring;
    ``window``, ``softcap`` and ``sinks`` (H,) as in :data:`packing.kernels.VARLEN_OPTIONS`."""
    return fa4_chunk_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal, scale=scale, window=window,
                            softcap=softcap, sinks=sinks)


def fa4_chunk_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, causal: bool, *, scale: float | None = None, window: int | None = None,
                     softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """:func:`fa4_varlen` with the keys' boundaries apart from the queries': sequence i's queries
    ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` (Tq, H, D) attend its keys
    ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`` (Tk, H_kv, D), causal aligned bottom-right; out (Tq, H, D)."""
    if q.shape[-1] < VARLEN_MIN_HEAD_DIM["flash-attn-4"]:
        raise ValueError(
            f"FlashAttention-4's backward is wrong at head dimension {q.shape[-1]} (dq, dk and dv measured far off "
            f"fp32 at 16); it needs >= {VARLEN_MIN_HEAD_DIM['flash-attn-4']}: use torch's varlen_attn "
            "(attn='flash' picks it where FA4 is not installed) or a larger head dimension"
        )
    window_left = -1 if window is None else window - 1
    return _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale or 0.0, window_left,
                softcap or 0.0, sinks)[0]
