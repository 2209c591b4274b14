"""Kernel discovery: which varlen and xFormers kernels load and run here, resolved once per process.

Adapters resolve their kernel at construction, never per layer: a cached lookup called inside every
layer breaks the ``torch.compile`` graph.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor


@functools.cache
def flash_backend() -> tuple[str, Callable[..., Tensor]] | None:
    """(name, fn(q, k, v, cu_seqlens, max_seqlen, causal) -> out) for the best varlen kernel, or None.

    q is (T, H, D); k and v may have fewer heads, (T, H_kv, D) with H a multiple of H_kv: every
    backend runs grouped-query attention in the kernel, without repeating k and v.
    """
    from models.attention.flash4 import fa4_available, fa4_varlen

    if fa4_available():
        # A custom op (models.attention.flash4): traced as Python, FA4's launcher broke the graph
        # and recompiled on every layer, and behind torch.compiler.disable it still broke the graph
        # in every layer (H200; counts in benchmarks/results/README.md).
        return "flash-attn-4", fa4_varlen
    try:
        import flash_attn

        fa2 = flash_attn.flash_attn_varlen_func
    except (ImportError, AttributeError):
        pass
    else:

        def run_fa2(q, k, v, cu, max_len, causal):
            return fa2(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                       max_seqlen_k=max_len, causal=causal)

        return "flash-attn-2", run_fa2
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # Where varlen_attn has enable_gqa it refuses fewer key/value heads without it; where it has
    # not, it hands them to the FA2 kernel, which takes them as they are.
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
    if "window_size" in params:  # torch >= 2.11

        def run_torch(q, k, v, cu, max_len, causal):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1), **gqa)

    else:  # torch 2.10

        def run_torch(q, k, v, cu, max_len, causal):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal, **gqa)

    return "torch.varlen_attn", run_torch


@functools.cache
def fmha_backend() -> tuple[str, ModuleType] | None:
    """("xformers" or "mslk", its fmha module) for the first whose CUDA kernels run, or None."""
    if not torch.cuda.is_available():
        return None
    for name, module in (("xformers", "xformers.ops.fmha"), ("mslk", "mslk.attention.fmha")):
        try:
            fmha = importlib.import_module(module)
            x = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
            fmha.memory_efficient_attention(x, x, x)  # xFormers imports fine but fails here on torch 2.11
        except Exception:  # noqa: BLE001 - any failure means "this package's kernels do not run here"
            continue
        return name, fmha
    return None
