"""``packing_varlen``: an attention implementation for transformers models that reads the packed
row's ``cu_seq_lens_q`` and ``max_length_q`` (from :func:`packing.interop.hf.hf_kwargs`) and runs this
project's varlen kernel: torch's ``varlen_attn`` (or FlashAttention-4/2 when installed) on CUDA,
exact per-document attention on a CPU (SDPA with a (T, T) document mask: T² bools, so keep long rows
on a GPU). It needs no flash-attn package, it compiles to one graph with no host read, and it
refuses what it cannot compute instead of attending across documents.

Example:
    >>> from models.hf_attention import register
    >>> name = register()  # once per process
    >>> # model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    >>> # loss = model(**packing.interop.hf.hf_kwargs(batch, model)).loss
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.kernels import flash_backend
from packing.boundaries import block_causal_mask

NAME = "packing_varlen"

# The CUDA kernel, resolved once by register(): the cached lookup that every layer's call made broke
# the torch.compile graph (issue 13, H200: with it and the cache on, a compiled Llama ran as 22 graphs).
_kernel: tuple[str, Callable[..., Tensor]] | None = None


def register() -> str:
    """Register ``packing_varlen`` with transformers' ``AttentionInterface``; returns the name.

    It resolves the CUDA kernel here, once (:func:`kernel_name` says which). It registers no mask
    function on purpose: for an implementation without one, transformers builds no attention mask,
    and the boundaries come only from ``cu_seq_lens_q``.
    """
    from transformers import AttentionInterface

    global _kernel
    _kernel = flash_backend() if torch.cuda.is_available() else None
    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def kernel_name() -> str | None:
    """The kernel ``packing_varlen`` runs on CUDA (``flash-attn-4``, ``flash-attn-2`` or
    ``torch.varlen_attn``), or None where there is none (a CPU machine, or before :func:`register`)."""
    return None if _kernel is None else _kernel[0]


def varlen_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention signature: query (1, H, T, D), key and value (1, H_kv, T, D); returns
    ((1, T, H, D), None). The documents are the blocks of ``kwargs["cu_seq_lens_q"]`` (num_docs + 1,).

    Nothing here reads a tensor's values on the host, so under ``torch.compile`` the call is part of
    the graph, and with static kwargs (``HFPackedCollator(..., total_tokens=, max_seqs=,
    max_seqlen=)``) every batch has the same shapes and constants: one compilation.
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            "attn_implementation 'packing_varlen' needs cu_seq_lens_q and max_length_q; call "
            "model(**packing.interop.hf.hf_kwargs(batch, model)) with a packed batch"
        )
    if query.shape[0] != 1:
        raise ValueError(f"'packing_varlen' takes one packed row, got batch size {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("'packing_varlen' takes no attention_mask: the boundaries come from cu_seq_lens_q")
    if dropout:
        raise ValueError(
            f"'packing_varlen' has no attention dropout, got dropout={dropout}; set the config's attention "
            "dropout (attn_pdrop, attention_dropout) to 0 or call model.eval()"
        )
    head_dim = query.shape[-1]
    if scaling is not None and abs(scaling - head_dim**-0.5) > 1e-6 * head_dim**-0.5:
        raise ValueError(f"'packing_varlen' scales by 1/sqrt(head_dim) = {head_dim**-0.5:g}, the model asks {scaling:g}")
    causal = module.is_causal if is_causal is None else is_causal
    # (T, H, D) and (T, H_kv, D): grouped-query attention goes to the kernel as it is, k and v unrepeated
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if not q.is_cuda:
        return _masked(q, k, v, cu, causal)[None], None
    if _kernel is None:
        raise ValueError(
            "'packing_varlen' on CUDA needs a varlen kernel (torch >= 2.10, flash-attn-4 or flash-attn 2), "
            "resolved by models.hf_attention.register(): call it after CUDA is available"
        )
    if v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"'packing_varlen' on CUDA needs bf16 or fp16, got {v.dtype}; run under torch.autocast")
    # Rotary embeddings multiply by fp32 cos/sin, so Llama's q and k arrive in fp32 under autocast
    # while v comes from a bf16 projection (seen on an H200); the kernel takes v's dtype.
    q, k = q.to(v.dtype), k.to(v.dtype)
    return _kernel[1](q, k, v, cu, max_len, causal)[None], None


def _masked(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool) -> Tensor:
    """Exact attention within each block of ``cu_seqlens``, for the CPU: SDPA with a (T, T) document
    mask built on the device from the boundaries, so it compiles without reading them on the host."""
    allowed = block_causal_mask(cu_seqlens, q.shape[0], causal=causal)  # (T, T)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=allowed,
                                         enable_gqa=k.shape[1] != q.shape[1])  # (H, T, D)
    return out.transpose(0, 1)
