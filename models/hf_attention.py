"""``packing_varlen``: an attention implementation for transformers models that reads the packed
row's ``cu_seq_lens_q`` and ``max_length_q`` (from :func:`packing.hf.hf_kwargs`) and runs this
project's varlen kernel: torch's ``varlen_attn`` (or FlashAttention-4/2 when installed) on CUDA,
exact per-document attention on a CPU. It needs no flash-attn package, and it refuses what it
cannot compute instead of attending across documents.

Example:
    >>> from models.hf_attention import register
    >>> name = register()  # once per process
    >>> # model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    >>> # loss = model(**packing.hf.hf_kwargs(batch, model)).loss
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention import flash_backend

NAME = "packing_varlen"


def register() -> str:
    """Register ``packing_varlen`` with transformers' ``AttentionInterface``; returns the name.

    It registers no mask function on purpose: for an implementation without one, transformers
    builds no attention mask, and the boundaries come only from ``cu_seq_lens_q``.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME


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
    ((1, T, H, D), None). The documents are the blocks of ``kwargs["cu_seq_lens_q"]`` (num_docs + 1,)."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            "attn_implementation 'packing_varlen' needs cu_seq_lens_q and max_length_q; call "
            "model(**packing.hf.hf_kwargs(batch, model)) with a packed batch"
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
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D), (T, H_kv, D)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves H / H_kv query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if q.is_cuda:
        backend = flash_backend()
        if backend is None:
            raise ValueError("'packing_varlen' on CUDA needs a varlen kernel: torch >= 2.10, flash-attn-4 or flash-attn 2")
        if q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            # Rotary embeddings multiply by fp32 cos/sin, so Llama's q and k arrive in fp32 even under
            # autocast (seen on an H200); the kernel takes the autocast dtype, as transformers' flash path does.
            q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"'packing_varlen' on CUDA needs bf16 or fp16, got {q.dtype}; run under torch.autocast")
        out = backend[1](q, k, v, cu, max_len, causal)
    else:
        out = _per_document(q, k, v, cu.tolist(), causal)  # a CPU tensor: reading it costs no sync
    return out[None], None


def _per_document(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], causal: bool) -> Tensor:
    """Exact attention within each [bounds[i], bounds[i + 1]) block, for the CPU."""
    out = torch.zeros_like(q)  # rows outside every block (none, from hf_kwargs) stay 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
    return out
