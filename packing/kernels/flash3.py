"""FlashAttention-3 (the ``hopper/`` build of flash-attention, module ``flash_attn_interface``) for the
``flash`` adapter, on Hopper (sm90), where it is what production training runs.

FA3 publishes no wheels: it builds from source (``cd flash-attention/hopper && python setup.py
install``; its ``FLASH_ATTENTION_DISABLE_*`` switches cut the build to the kernels a model uses:
a head dimension, bf16, varlen, forward and backward). The build's own ``flash_attn_config`` says
which switches were on: a head dimension or an option it left out counts as not computed here
(:func:`built_head_dim`, :func:`built_options`), so a layer takes the next kernel instead of
failing. Its Python interface already wraps the kernels as torch custom ops with fake
implementations, so ``torch.compile`` keeps them in the graph.

Every call into ``flash_attn_interface`` goes through :func:`_interface`, which checks that the
private functions have the parameters written against here (FA3 builds from source and reports no
usable version), so an incompatible build is reported as not loading, never run.

Shapes as in :mod:`packing.kernels.flash4`: q (T, H, D), k and v (T, H_kv, D) in bf16 or fp16,
cu_seqlens (num_seqs + 1,) int32; out (T, H, D). The packed form takes qkv (T, 3, H, D) and its
backward writes one (T, 3, H, D) gradient (FA3's backward takes dq, dk, dv outputs).

Example (needs FA3 and a Hopper GPU):
    >>> from packing.kernels.flash3 import fa3_varlen  # doctest: +SKIP
    >>> out = fa3_varlen(q, k, v, cu_seqlens, max_seqlen=1024, causal=True)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect

from torch import Tensor

from packing.kernels.common import flash_window, gpu_loads


# The parameters of FA3's private functions, in the order the calls below pass them positionally.
_BACKWARD_PARAMS = ("dout", "q", "k", "v", "out", "softmax_lse", "cu_seqlens_q", "cu_seqlens_k", "sequed_q",
                    "sequed_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv", "softmax_scale", "causal")


@functools.cache
def _interface():
    """FA3's ``flash_attn_interface``, once its private functions are the ones written against here:
    ``_flash_attn_backward`` takes these 17 leading parameters, by position, in this order."""
    import flash_attn_interface

    backward = flash_attn_interface._flash_attn_backward
    # Newer builds define it as a torch custom op, whose own signature is (*args, **kwargs): read the function it wraps.
    backward = getattr(backward, "_init_fn", backward)
    params = tuple(inspect.signature(backward).parameters)[: len(_BACKWARD_PARAMS)]
    if len(params) < len(_BACKWARD_PARAMS) or params[12:15] != ("dq", "dk", "dv") or "cu_seqlens_q" not in params:
        raise ImportError(f"flash_attn_interface._flash_attn_backward takes {params}, not the parameters this wrapper "
                          f"passes by position ({_BACKWARD_PARAMS}); build FA3 from flash-attention's hopper/ at a "
                          "commit with that signature")
    return flash_attn_interface


# FA3 compiles each head dimension as its own kernels, rounded up to one of these; a build may switch
# any of them off (FLASH_ATTENTION_DISABLE_HDIM128, ...), and a call at a missing one fails at run time.
_HEAD_DIM_BUCKETS = (64, 96, 128, 192, 256)


def build_flags() -> dict[str, bool]:
    """The ``FLASH_ATTENTION_DISABLE_*`` switches the installed FA3 was built with (its own
    ``flash_attn_config`` module; empty where the build has none: then everything counts as built)."""
    try:
        import flash_attn_config
    except ImportError:
        return {}
    return {k.replace("FLASH_ATTENTION_", "").replace("FLASHATTENTION_", ""): bool(v)
            for k, v in flash_attn_config.CONFIG.get("build_flags", {}).items()}


def built_head_dim(head_dim: int, flags: dict[str, bool] | None = None) -> bool:
    """Whether this FA3 build has kernels for ``head_dim`` (the bucket it rounds up to is not switched off).

    Examples:
        >>> built_head_dim(128, {"DISABLE_HDIM64": True}), built_head_dim(64, {"DISABLE_HDIM64": True})
        (True, False)
        >>> built_head_dim(80, {"DISABLE_HDIM96": True}), built_head_dim(300, {})
        (False, False)
    """
    flags = build_flags() if flags is None else flags
    bucket = next((b for b in _HEAD_DIM_BUCKETS if head_dim <= b), None)
    return bucket is not None and not flags.get(f"DISABLE_HDIM{bucket}", False)


def built_options(flags: dict[str, bool] | None = None) -> frozenset[str]:
    """The keyword options of :data:`packing.kernels.VARLEN_OPTIONS` this FA3 build computes: a build
    with ``DISABLE_LOCAL`` has no sliding window, one with ``DISABLE_SOFTCAP`` no softcap.

    Examples:
        >>> sorted(built_options({"DISABLE_LOCAL": True}))
        ['scale', 'softcap']
    """
    flags = build_flags() if flags is None else flags
    off = {"window": flags.get("DISABLE_LOCAL", False), "softcap": flags.get("DISABLE_SOFTCAP", False)}
    return frozenset(o for o in ("scale", "window", "softcap") if not off.get(o, False))


def fa3_available() -> bool:
    """Whether FlashAttention-3 imports, its private API is the one wrapped here, and the GPU is
    Hopper (sm90): FA3's kernels are sm90 only."""
    # flash_attn_interface is FA3's top-level module; it loads flash_attn_3._C, its kernels.
    if not gpu_loads("flash_attn_interface", max_major=9):
        return False
    try:
        _interface()
    except ImportError:
        return False
    return True


def fa3_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool, *,
               scale: float | None = None, window: int | None = None, softcap: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v within each block of ``cu_seqlens``: (T, H, D). ``scale`` defaults to
    1/sqrt(D); ``window`` and ``softcap`` as in :data:`packing.kernels.VARLEN_OPTIONS`."""
    return bound_varlen()(q, k, v, cu_seqlens, max_seqlen, causal, scale=scale, window=window, softcap=softcap)


def bound_varlen():
    """:func:`fa3_varlen` with FA3's checked interface looked up now, once: what the kernel door hands
    out. Called inside every layer, the cached lookup made dynamo trace ``_interface`` per layer
    (dynamo warns about tracing an lru_cache-wrapped function)."""
    interface = _interface()

    def run(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool, *,
            scale: float | None = None, window: int | None = None, softcap: float | None = None) -> Tensor:
        return interface.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                softmax_scale=scale, causal=causal,
                                                window_size=flash_window(window, causal), softcap=softcap or 0.0)

    return run


def bound_chunk_varlen():
    """FA3 with the keys' boundaries apart from the queries' (:func:`packing.kernels.chunk_varlen_kernels`),
    its checked interface looked up now, once."""
    interface = _interface()

    def run(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, causal: bool, *,
            scale: float | None = None, window: int | None = None, softcap: float | None = None) -> Tensor:
        return interface.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                                window_size=flash_window(window, causal), softcap=softcap or 0.0)

    return run
