"""Attention adapters: one small class per kernel, each declaring the batch layouts it takes.

Every adapter computes ``softmax(q kᵀ / sqrt(D)) v`` within each sequence of a
:class:`~packing.batch.Batch`, never across sequences and never over padding, and takes q, k, v in
the layout's dense token form (``Batch.unwrap``):

- ``padded``: (B, L, H, D), right-padded rows;
- ``packed``: (T, H, D), sequences back to back, slots past ``cu_seqlens[-1]`` are padding;
- ``nested``: (N, H, D), the jagged values, sequence boundaries at ``cu_seqlens``.

It returns the output in the same shape as q. Adding an adapter means writing one class with
``name``, ``layouts`` and ``__call__``, and one line in :data:`ADAPTERS`.

Example:
    >>> import torch
    >>> from packing import get_collator
    >>> batch = get_collator("concat")([[5, 6, 7], [8, 9]])
    >>> q = k = v = torch.randn(batch.num_slots, 2, 4)  # (T, H, D)
    >>> get_adapter("naive", batch.layout, "cpu")(q, k, v, batch, causal=True).shape
    torch.Size([5, 2, 4])
"""

from __future__ import annotations

from itertools import accumulate
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from packing.batch import LAYOUTS, Batch


class AttentionAdapter:
    """The interface. Subclasses set ``name`` and ``layouts`` and implement ``__call__``."""

    name: ClassVar[str]
    layouts: ClassVar[frozenset[str]]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})

    @classmethod
    def available(cls, device: torch.device) -> bool:
        """Whether this adapter can run on ``device`` in this environment."""
        return device.type in cls.devices

    @property
    def backend(self) -> str:
        """The kernel that actually runs, for benchmark records."""
        return self.name

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        raise NotImplementedError


class NaiveAttention(AttentionAdapter):
    """The ground truth: explicit fp32 softmax(q kᵀ / sqrt(D)) v, one sequence at a time.

    Slow and obviously correct, for any layout. It reads only real positions, so padding slots
    (even NaN ones) cannot reach the output; their output is 0.
    """

    name = "naive"
    layouts = frozenset(LAYOUTS)

    @property
    def backend(self) -> str:
        return "naive-fp32"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        scale = q.shape[-1] ** -0.5
        if batch.layout == "padded":
            spans = [(b, slice(0, n)) for b, n in enumerate(batch.seq_lens)]
        else:
            starts = list(accumulate(batch.seq_lens, initial=0))  # host ints, no device read
            spans = [(slice(s, e),) for s, e in zip(starts[:-1], starts[1:])]
        for idx in spans:
            qs, ks, vs = (t[idx].float().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
            scores = qs @ ks.transpose(-1, -2) * scale  # (H, n, n)
            if causal:
                n = scores.shape[-1]
                future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            out[idx] = (scores.softmax(-1) @ vs).transpose(0, 1)  # (n, H, D)
        return out.to(q.dtype)


class SdpaAttention(AttentionAdapter):
    """``F.scaled_dot_product_attention`` on the padded layout.

    Causal uses ``is_causal=True``: rows are right-padded, so a real query only ever sees earlier
    real keys. Bidirectional masks padding keys with the batch's ``attention_mask``.

    Masked keys get weight 0 but are still multiplied, so a NaN in a padding slot reaches the
    output (0 x NaN; checked on torch 2.13 CPU). Padding slots hold the embedded pad id, which is
    finite; what the pad id *is* does not change real outputs (tested).
    """

    name = "sdpa"
    layouts = frozenset({"padded"})

    @property
    def backend(self) -> str:
        return "torch.sdpa"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        mask = None if causal else batch.attention_mask[:, None, None, :]  # (B, 1, 1, L) over keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
        )  # (B, H, L, D)
        return out.transpose(1, 2)  # (B, L, H, D)


# Preference order for "auto": fastest first; the naive reference takes any layout, so it is last.
ADAPTERS: dict[str, type[AttentionAdapter]] = {cls.name: cls for cls in (SdpaAttention, NaiveAttention)}


def adapters_for(layout: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the adapters that take ``layout`` (and run on ``device``, if given), fastest first."""
    dev = None if device is None else torch.device(device)
    return [n for n, c in ADAPTERS.items() if layout in c.layouts and (dev is None or c.available(dev))]


def get_adapter(name: str, layout: str, device: torch.device | str) -> AttentionAdapter:
    """Build the adapter ``name`` for ``layout`` on ``device``; ``"auto"`` picks the fastest available.

    Raises ``ValueError`` for an unknown name, a layout the adapter cannot take, or a device it
    cannot run on, listing the adapters that can.
    """
    device = torch.device(device)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if name == "auto":
        return ADAPTERS[adapters_for(layout, device)[0]]()
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
            f"attention adapter {name!r} is not available on {device}; "
            f"adapters for {layout!r} there: {', '.join(adapters_for(layout, device))}"
        )
    return cls()
