"""Attention adapters: one small class per kernel, each declaring the batch layouts it takes.

Every adapter computes ``softmax(q kᵀ / sqrt(D)) v`` within each sequence of a
:class:`~packing.batch.Batch`, never across sequences and never over padding, and takes q, k, v in
the layout's dense token form (``Batch.unwrap``):

- ``padded``: (B, L, H, D), right-padded rows;
- ``packed``: (T, H, D), sequences back to back, slots past ``cu_seqlens[-1]`` are padding;
- ``nested``: (N, H, D), the jagged values, sequence boundaries at ``cu_seqlens``.

It returns the output in the same shape as q. Adding an adapter means one file here with one
:class:`~models.attention.base.AttentionAdapter` subclass (``name``, ``layouts``, ``attend``), and
one line in :data:`ADAPTERS`. This package is the registry; each adapter lives in its own module
(``naive``, ``sdpa``, ``sdpa_nested``, ``sdpa_docs``, ``flash``, ``xformers``, ``flex``), and kernel discovery in
:mod:`packing.kernels`.

=================  ========  ===================================================  ============
adapter            layout    kernel (``backend``)                                 devices
=================  ========  ===================================================  ============
``flash``          packed    flash-attn-4, flash-attn-2 or torch.varlen_attn      CUDA
``xformers``       packed    xFormers or mslk ``memory_efficient_attention``      CUDA
``sdpa_nested``    nested    SDPA on jagged NestedTensors                          CUDA; CPU bidirectional
``sdpa``           padded    ``F.scaled_dot_product_attention``                   CUDA, CPU
``flex``           packed    ``flex_attention`` + document BlockMask              CUDA; CPU forward only
``sdpa_docs``      packed,   SDPA on the documents gathered into one block       CPU (auto), CUDA
                   nested
``naive``          any       explicit fp32 softmax per sequence (ground truth)    CUDA, CPU
=================  ========  ===================================================  ============

Example:
    >>> import torch
    >>> from packing import get_collator
    >>> batch = get_collator("concat")([[5, 6, 7], [8, 9]])
    >>> q = k = v = torch.randn(batch.num_slots, 2, 4)  # (T, H, D)
    >>> get_adapter("naive", batch.layout, "cpu")(q, k, v, batch, causal=True).shape
    torch.Size([5, 2, 4])
    >>> adapter_for(batch).name  # "auto" for this batch on its device
    'sdpa_docs'

"""

from __future__ import annotations

import torch

from models.attention.base import AttentionAdapter
from models.attention.flash import FlashVarlenAttention
from models.attention.flex import FlexDocumentAttention
from models.kernels import flash_backend, fmha_backend
from models.attention.naive import NaiveAttention
from models.attention.sdpa import SdpaAttention
from models.attention.sdpa_docs import SdpaDocsAttention
from models.attention.sdpa_nested import SdpaNestedAttention
from models.attention.xformers import XformersAttention
from packing.batch import LAYOUTS, Batch

__all__ = [
    "ADAPTERS",
    "AttentionAdapter",
    "FlashVarlenAttention",
    "FlexDocumentAttention",
    "NaiveAttention",
    "SdpaAttention",
    "SdpaDocsAttention",
    "SdpaNestedAttention",
    "XformersAttention",
    "adapter_for",
    "adapters_for",
    "auto_adapter",
    "collator_for",
    "flash_backend",
    "fmha_backend",
    "get_adapter",
]


# Preference order for "auto": fastest first; the naive reference takes any layout, so it is last.
ADAPTERS: dict[str, type[AttentionAdapter]] = {
    cls.name: cls
    for cls in (
        FlashVarlenAttention,
        XformersAttention,
        SdpaNestedAttention,
        SdpaAttention,
        FlexDocumentAttention,
        SdpaDocsAttention,
        NaiveAttention,
    )
}


def adapters_for(layout: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the adapters that take ``layout`` (and run on ``device``, if given), fastest first."""
    dev = None if device is None else torch.device(device)
    return [n for n, c in ADAPTERS.items() if layout in c.layouts and (dev is None or c.available(dev))]


def auto_adapter(layout: str, device: torch.device | str, *, attn_bias: bool = False) -> str:
    """The adapter ``"auto"`` picks: the first preferred one that takes ``layout`` on ``device``.

    A batch with an ``attn_bias`` (the ``xformers`` collator's mask) first gets an adapter that
    consumes that mask, where one runs: by layout alone, ``flash`` would take the packed row and the
    mask built for xFormers would go unused.
    """
    dev = torch.device(device)
    takes = [n for n, c in ADAPTERS.items() if layout in c.layouts and c.preferred(dev)]
    consumers = [n for n in takes if ADAPTERS[n].consumes_attn_bias]
    return consumers[0] if attn_bias and consumers else takes[0]


def collator_for(adapter: str) -> str:
    """The collator whose batches ``adapter`` is built for: the one that makes the mask it consumes
    (``xformers``), else the plain collator of its first layout (``pad_longest``, ``nested``,
    ``concat``). Its inverse, for a batch, is :func:`adapter_for`.

    Example:
        >>> collator_for("xformers"), collator_for("flash"), collator_for("sdpa")
        ('xformers', 'concat', 'pad_longest')
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown attention adapter {adapter!r}; known: {', '.join(ADAPTERS)}")
    cls = ADAPTERS[adapter]
    if cls.consumes_attn_bias:
        return "xformers"
    return {"padded": "pad_longest", "nested": "nested", "packed": "concat"}[sorted(cls.layouts)[0]]


def get_adapter(name: str, layout: str, device: torch.device | str, *, attn_bias: bool = False) -> AttentionAdapter:
    """Build the adapter ``name`` for ``layout`` on ``device``; ``"auto"`` picks the fastest available
    (:func:`auto_adapter`; ``attn_bias``: whether the batches carry an xFormers mask).

    Raises ``ValueError`` for an unknown name, a layout the adapter cannot take, or a device it
    cannot run on, listing the adapters that can.
    """
    device = torch.device(device)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if name == "auto":
        return ADAPTERS[auto_adapter(layout, device, attn_bias=attn_bias)](device)
    if name not in ADAPTERS:
        raise ValueError(f"unknown attention adapter {name!r}; known: auto, {', '.join(ADAPTERS)}")
    cls = ADAPTERS[name]
    if layout not in cls.layouts:
        raise ValueError(
            f"attention adapter {name!r} takes layouts {sorted(cls.layouts)}, not {layout!r}; "
            f"adapters that take {layout!r}: {', '.join(adapters_for(layout))}"
        )
    if not cls.available(device):
        raise ValueError(
            f"attention adapter {name!r} is not available on {device}: it needs {cls.needs}; "
            f"adapters for {layout!r} there: {', '.join(adapters_for(layout, device))}"
        )
    return cls(device)


def adapter_for(batch: Batch, name: str = "auto", device: torch.device | str | None = None) -> AttentionAdapter:
    """The adapter ``name`` for this batch's layout on ``device`` (default: the batch's own device);
    ``"auto"`` also reads what the batch carries (see :func:`auto_adapter`)."""
    device = batch.input_ids.device if device is None else device
    return get_adapter(name, batch.layout, device, attn_bias=batch.attn_bias is not None)
