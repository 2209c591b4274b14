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


Varlen = Callable[..., Tensor]  # fn(q, k, v, cu_seqlens, max_seqlen, causal, **options) -> out

# What each varlen kernel computes beyond softmax(q kᵀ / sqrt(D)) v, by the name of its option:
#   scale    a softmax scale other than 1/sqrt(D) (Gemma's query_pre_attn_scalar, Granite's multiplier)
#   window   a causal sliding window of ``window`` keys counting the query itself (transformers'
#            sliding_window; the flash kernels' window_size=(window - 1, 0))
#   softcap  logits capped as softcap * tanh(logits / softcap) before the softmax (Gemma 2)
#   sinks    a learnable per-head logit (H,) in every softmax's denominator (gpt-oss' s_aux), with
#            its gradient: FA4's learnable_sink (Hopper and Blackwell)
# An option a kernel lacks is never passed to it: models.hf_attention picks the first kernel that
# has every option a layer asks for, and refuses the layer where none does. A value head dimension
# other than the query's runs on no CUDA kernel here (the CPU path has it).
VARLEN_OPTIONS = {
    "flash-attn-3": frozenset({"scale", "window", "softcap"}),
    "flash-attn-4": frozenset({"scale", "window", "softcap", "sinks"}),
    "flash-attn-2": frozenset({"scale", "window", "softcap"}),
    "torch.varlen_attn": frozenset({"scale", "window"}),  # torch >= 2.11; 2.10's has neither
}

# The smallest head dimension whose gradients a kernel computes right. FA4 4.0.0b36 on an H200 gave
# the right forward at head dimension 16 but dq, dk and dv 83-94% off fp32 (32, 64 and 128 within
# 0.5%): benchmarks/results/2026-12-01-h200-families/probe_head_dim.txt (python -m
# benchmarks.kernel_head_dims). torch's kernel was right at 16.
VARLEN_MIN_HEAD_DIM = {"flash-attn-4": 32}


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


def varlen_options(name: str) -> frozenset[str]:
    """The keyword options (``scale``, ``window``, ``softcap``, ``sinks``) varlen kernel ``name`` computes."""
    if name == "torch.varlen_attn":
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        return frozenset(o for o, p in (("scale", "scale"), ("window", "window_size")) if p in params)
    return VARLEN_OPTIONS[name]


def takes_head_dim(name: str, head_dim: int) -> bool:
    """Whether varlen kernel ``name`` computes head dimension ``head_dim`` right, gradients included."""
    return head_dim >= VARLEN_MIN_HEAD_DIM.get(name, 1)


def flash_window(window: int | None, causal: bool) -> tuple[int, int]:
    """A flash kernel's ``window_size=(left, right)`` for transformers' ``sliding_window`` (keys
    counting the query itself; None for none): (window - 1, 0) causal, -1 meaning unbounded."""
    left = -1 if window is None else window - 1
    return (left, 0) if causal else (left, left)


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

    def run_fa2(q, k, v, cu, max_len, causal, *, scale=None, window=None, softcap=None):
        return fa2(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                   causal=causal, softmax_scale=scale, window_size=flash_window(window, causal), softcap=softcap or 0.0)

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

        def run_torch(q, k, v, cu, max_len, causal, *, scale=None, window=None, softcap=None):
            _refuse_options("torch.varlen_attn", softcap=softcap)
            scaled = {} if scale is None else {"scale": scale}  # checked against the signature by varlen_options
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=flash_window(window, causal), **scaled,
                               **gqa)

    else:  # torch 2.10

        def run_torch(q, k, v, cu, max_len, causal, *, scale=None, window=None, softcap=None):
            _refuse_options("torch.varlen_attn", scale=scale, window=window, softcap=softcap)
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal, **gqa)

    return run_torch


def _refuse_options(kernel: str, **options) -> None:
    """A ValueError for an option that ``kernel`` does not compute (never dropped)."""
    asked = {k: v for k, v in options.items() if v is not None}
    if asked:
        raise ValueError(f"the varlen kernel {kernel!r} does not compute {asked}; it takes {sorted(varlen_options(kernel))}")


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
