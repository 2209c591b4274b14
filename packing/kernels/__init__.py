"""The one place that decides which varlen attention kernels load (FlashAttention-3,
FlashAttention-4 custom ops, flash-attn 2, torch's ``varlen_attn``), and what each computes.
Resolved once per process; :mod:`packing.kernels.choice` chooses among them per layer.

Everything that runs a varlen kernel asks here: ``packing.interop.hf_attention`` (transformers'
``packing_varlen``) and the toy GPT's ``flash`` adapter. The kernel modules beside this one
(``flash3``, ``flash4``) each wrap their package's private API in one function and check its
version at load (:mod:`packing.kernels.common`). Nothing here imports ``models`` or ``benchmarks``;
what only the toy GPT uses (packed-qkv ops, xFormers, quack) lives in ``models``.

Adapters resolve their kernel at construction, never per layer: a cached lookup called inside every
layer breaks the ``torch.compile`` graph.

Examples:
    >>> sorted(VARLEN_OPTIONS["flash-attn-4"])
    ['scale', 'sinks', 'softcap', 'window']
    >>> takes_head_dim("flash-attn-4", 16), takes_head_dim("torch.varlen_attn", 16)
    (False, True)
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from packing.kernels.common import (VARLEN_HEAD_DIM_MULTIPLE, VARLEN_MAX_HEAD_DIM, VARLEN_MIN_HEAD_DIM,
                                    check_version, flash_window, gpu_loads)

__all__ = ["VARLEN_OPTIONS", "VARLEN_MIN_HEAD_DIM", "chunk_varlen_kernels", "flash_window", "gpu_loads", "head_dim_check",
           "takes_head_dim", "varlen_kernels", "varlen_options"]

Varlen = Callable[..., Tensor]  # fn(q, k, v, cu_seqlens, max_seqlen, causal, **options) -> out

# What each varlen kernel computes beyond softmax(q kᵀ / sqrt(D)) v, by the name of its option:
#   scale    a softmax scale other than 1/sqrt(D) (Gemma's query_pre_attn_scalar, Granite's multiplier)
#   window   a causal sliding window of ``window`` keys counting the query itself (transformers'
#            sliding_window; the flash kernels' window_size=(window - 1, 0))
#   softcap  logits capped as softcap * tanh(logits / softcap) before the softmax (Gemma 2)
#   sinks    a learnable per-head logit (H,) in every softmax's denominator (gpt-oss' s_aux), with
#            its gradient: FA4's learnable_sink (Hopper and Blackwell)
# An option a kernel lacks is never passed to it: packing.interop.hf_attention picks the first kernel that
# has every option a layer asks for, and refuses the layer where none does. A value head dimension
# other than the query's runs on no CUDA kernel here (the CPU path has it).
VARLEN_OPTIONS = {
    "flash-attn-3": frozenset({"scale", "window", "softcap"}),
    "flash-attn-4": frozenset({"scale", "window", "softcap", "sinks"}),
    "flash-attn-2": frozenset({"scale", "window", "softcap"}),
    "torch.varlen_attn": frozenset({"scale", "window"}),  # torch >= 2.11; 2.10's has neither
}

def varlen_kernels() -> dict[str, Varlen]:
    """Every varlen kernel that loads here, best first: ``flash-attn-3`` (Hopper only),
    ``flash-attn-4``, ``flash-attn-2``, ``torch.varlen_attn``. Each is
    fn(q, k, v, cu_seqlens, max_seqlen, causal, *, scale=None, window=None, softcap=None) -> out with
    q (T, H, D) and k, v (T, H_kv, D), H a multiple of H_kv: grouped-query attention runs in the
    kernel. :func:`varlen_options` says which of the keyword options each one takes."""
    found = {}
    kernels = (("flash-attn-3", _fa3), ("flash-attn-4", _fa4), ("flash-attn-2", _fa2), ("torch.varlen_attn", _torch_varlen))
    for name, find in kernels:
        run = find()
        if run is not None:
            found[name] = run
    return found


# fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, *, scale=None, window=None,
#    softcap=None[, sinks=None]) -> out; the options as in VARLEN_OPTIONS, each kernel's those of its
#    one-boundary form (varlen_options)
ChunkVarlen = Callable[..., Tensor]


def chunk_varlen_kernels() -> dict[str, ChunkVarlen]:
    """The varlen kernels that take the keys' boundaries apart from the queries', best first:
    ``flash-attn-3``, ``flash-attn-4``, ``flash-attn-2``, ``torch.varlen_attn``. Sequence i's queries
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` attend its keys ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``;
    causal is aligned bottom-right (query i of Lq sees keys j <= i + Lk - Lq), flash-attn's convention
    since 2.1 and that of torch's port. A context-parallel shard runs its chunks this way; its
    attention checks a kernel against the written-out softmax at first use
    (:mod:`packing.context.varlen`)."""
    found = {}
    kernels = (("flash-attn-3", _fa3_chunks), ("flash-attn-4", _fa4_chunks), ("flash-attn-2", _fa2_chunks),
               ("torch.varlen_attn", _torch_chunks))
    for name, find in kernels:
        run = find()
        if run is not None:
            found[name] = run
    return found


def _fa3_chunks() -> ChunkVarlen | None:
    from packing.kernels.flash3 import bound_chunk_varlen, fa3_available

    return bound_chunk_varlen() if fa3_available() else None


def _fa4_chunks() -> ChunkVarlen | None:
    from packing.kernels.flash4 import fa4_available, fa4_chunk_varlen

    return fa4_chunk_varlen if fa4_available() else None


def _fa2_chunks() -> ChunkVarlen | None:
    try:
        import flash_attn

        fa2 = flash_attn.flash_attn_varlen_func
    except (ImportError, AttributeError):
        return None

    def run_fa2(q, k, v, cu_q, cu_k, max_q, max_k, causal, *, scale=None, window=None, softcap=None):
        return fa2(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                   causal=causal, softmax_scale=scale, window_size=flash_window(window, causal), softcap=softcap or 0.0)

    return run_fa2


def _torch_chunks() -> ChunkVarlen | None:
    if not torch.cuda.is_available():  # torch's varlen kernel is CUDA's
        return None
    return _torch_chunk_form()


def _torch_chunk_form() -> ChunkVarlen | None:
    """torch's ``varlen_attn`` with the keys' boundaries apart, where it has a window (torch >= 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params:  # torch < 2.11: no bottom-right window, and a chunk may need one
        return None
    # Where varlen_attn has enable_gqa it refuses fewer key/value heads without it; where it has
    # not (torch 2.11), it hands them to the FA2 kernel, which takes them as they are.
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}

    def run_torch(q, k, v, cu_q, cu_k, max_q, max_k, causal, *, scale=None, window=None, softcap=None):
        _refuse_options("torch.varlen_attn", softcap=softcap)
        scaled = {} if scale is None else {"scale": scale}  # checked against the signature by varlen_options
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=flash_window(window, causal), **scaled, **gqa)

    return run_torch


def varlen_options(name: str) -> frozenset[str]:
    """The keyword options (``scale``, ``window``, ``softcap``, ``sinks``) varlen kernel ``name`` computes."""
    if name == "torch.varlen_attn":
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        return frozenset(o for o, p in (("scale", "scale"), ("window", "window_size")) if p in params)
    if name == "flash-attn-3":  # a source build may leave the window or softcap kernels out
        from packing.kernels.flash3 import built_options

        return VARLEN_OPTIONS[name] & built_options()
    return VARLEN_OPTIONS[name]


def takes_head_dim(name: str, head_dim: int) -> bool:
    """Whether varlen kernel ``name`` computes head dimension ``head_dim`` right, gradients included
    (for FA3, also: whether this build has that head dimension's kernels)."""
    return head_dim_check(name)(head_dim)


def head_dim_check(name: str) -> Callable[[int], bool]:
    """:func:`takes_head_dim` for kernel ``name`` as a plain function of the head dimension, with
    the FA3 build's switches read now: safe to call while ``torch.compile`` traces a layer."""
    least, multiple = VARLEN_MIN_HEAD_DIM.get(name, 1), VARLEN_HEAD_DIM_MULTIPLE.get(name, 1)
    most = VARLEN_MAX_HEAD_DIM.get(name, float("inf"))

    def computes(head_dim: int) -> bool:
        return least <= head_dim <= most and head_dim % multiple == 0

    if name == "flash-attn-3":
        from packing.kernels.flash3 import build_flags, built_head_dim

        flags = build_flags()
        return lambda head_dim: computes(head_dim) and built_head_dim(head_dim, flags)
    return computes


def _fa3() -> Varlen | None:
    from packing.kernels.flash3 import bound_varlen, fa3_available

    # FA3 is Hopper's production kernel; on sm90 it comes first: it measured faster than FA4, FA2
    # and torch's kernel in the compiled training steps of the benchmarks (head dimensions 64 and 128).
    return bound_varlen() if fa3_available() else None


def _fa4() -> Varlen | None:
    from packing.kernels.flash4 import fa4_available, fa4_varlen

    # A custom op (packing.kernels.flash4): traced as Python, FA4's launcher broke the graph and
    # recompiled on every layer, and behind torch.compiler.disable it still broke the graph in
    # every layer.
    return fa4_varlen if fa4_available() else None


def _fa2() -> Varlen | None:
    try:
        import flash_attn

        fa2 = flash_attn.flash_attn_varlen_func  # FA4's flash_attn namespace package lacks it
    except (ImportError, AttributeError):
        return None

    def run_fa2(q, k, v, cu, max_len, causal, *, scale=None, window=None, softcap=None):
        return fa2(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                   causal=causal, softmax_scale=scale, window_size=flash_window(window, causal), softcap=softcap or 0.0)

    return run_fa2


def _torch_varlen() -> Varlen | None:
    chunks = _torch_chunk_form()
    if chunks is not None:  # torch >= 2.11: the chunk form, each document's keys its own queries'

        def run_torch(q, k, v, cu, max_len, causal, **options):
            return chunks(q, k, v, cu, cu, max_len, max_len, causal, **options)

        return run_torch
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}

    def run_torch(q, k, v, cu, max_len, causal, *, scale=None, window=None, softcap=None):  # torch 2.10
        _refuse_options("torch.varlen_attn", scale=scale, window=window, softcap=softcap)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal, **gqa)

    return run_torch


def _refuse_options(kernel: str, **options) -> None:
    """A ValueError for an option that ``kernel`` does not compute (never dropped)."""
    asked = {k: v for k, v in options.items() if v is not None}
    if asked:
        raise ValueError(f"the varlen kernel {kernel!r} does not compute {asked}; it takes {sorted(varlen_options(kernel))}")
