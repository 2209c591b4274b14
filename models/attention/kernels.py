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


Varlen = Callable[..., Tensor]  # fn(q, k, v, cu_seqlens, max_seqlen, causal) -> out


PackedVarlen = Callable[..., Tensor]  # fn(qkv, cu_seqlens, max_seqlen, causal) -> out


def gpu_loads(module: str, *, min_major: int = 9, max_major: int | None = None) -> bool:
    """Whether a CUDA GPU of compute capability major ``min_major`` (9: Hopper) up to ``max_major``
    is here and ``module`` imports: the check every Hopper-only kernel package needs."""
    if not torch.cuda.is_available():
        return False
    major = torch.cuda.get_device_capability()[0]
    if major < min_major or (max_major is not None and major > max_major):
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def varlen_kernels() -> dict[str, Varlen]:
    """Every varlen kernel that loads here, best first: ``flash-attn-3`` (Hopper only),
    ``flash-attn-4``, ``flash-attn-2``, ``torch.varlen_attn``. Each is
    fn(q, k, v, cu_seqlens, max_seqlen, causal) -> out with q (T, H, D) and k, v (T, H_kv, D), H a
    multiple of H_kv: grouped-query attention runs in the kernel."""
    found = {}
    kernels = (("flash-attn-3", _fa3), ("flash-attn-4", _fa4), ("flash-attn-2", _fa2), ("torch.varlen_attn", _torch_varlen))
    for name, find in kernels:
        run = find()
        if run is not None:
            found[name] = run
    return found


@functools.cache
def flash_backend() -> tuple[str, Varlen] | None:
    """(name, fn) for the best varlen kernel (the first of :func:`varlen_kernels`), or None."""
    return next(iter(varlen_kernels().items()), None)


def packed_kernel(name: str) -> PackedVarlen | None:
    """The packed form of varlen kernel ``name``: fn(qkv (T, 3, H, D), cu_seqlens, max_seqlen, causal)
    -> out (T, H, D), whose backward writes one (T, 3, H, D) gradient; None where it has none."""
    if name == "flash-attn-4":
        from models.attention.flash4 import fa4_varlen_qkvpacked

        return fa4_varlen_qkvpacked
    if name == "flash-attn-3":
        from models.attention.flash3 import fa3_varlen_qkvpacked

        return fa3_varlen_qkvpacked
    return None


def _fa3() -> Varlen | None:
    from models.attention.flash3 import fa3_available, fa3_varlen

    # FA3 is Hopper's production kernel; on sm90 it comes first (a build of it ran in
    # benchmarks/results/2026-11-24-h100-speed2: faster than FA4 and FA2 in the compiled seed step).
    return fa3_varlen if fa3_available() else None


def _fa4() -> Varlen | None:
    from models.attention.flash4 import fa4_available, fa4_varlen

    # A custom op (models.attention.flash4): traced as Python, FA4's launcher broke the graph and
    # recompiled on every layer, and behind torch.compiler.disable it still broke the graph in
    # every layer (H200; counts in benchmarks/results/README.md).
    return fa4_varlen if fa4_available() else None


def _fa2() -> Varlen | None:
    try:
        import flash_attn

        fa2 = flash_attn.flash_attn_varlen_func  # FA4's flash_attn namespace package lacks it
    except (ImportError, AttributeError):
        return None

    def run_fa2(q, k, v, cu, max_len, causal):
        return fa2(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                   causal=causal)

    return run_fa2


def _torch_varlen() -> Varlen | None:
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

    return run_torch


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
