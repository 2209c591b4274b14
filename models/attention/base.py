"""The adapter interface every attention kernel implements (see :mod:`models.attention`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from packing.batch import Batch


class AttentionAdapter:
    """The interface. Subclasses set ``name`` and ``layouts`` and implement :meth:`attend`.

    ``devices`` are where it can run at all; ``preferred_on`` where ``"auto"`` may pick it (a CPU
    fallback that is slower than another adapter stays out of ``auto``). :meth:`unsupported`
    names a case the adapter cannot compute, which raises a ``ValueError`` instead of running.
    """

    name: ClassVar[str]
    layouts: ClassVar[frozenset[str]]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    preferred_on: ClassVar[frozenset[str] | None] = None  # None: wherever it is available
    needs: ClassVar[str] = "nothing beyond torch"  # said when it is not available
    # True when padding keys are read with weight 0: a non-finite value there would then reach real
    # outputs as 0 x NaN. Padding slots hold the embedded pad id, which is finite.
    reads_padding: ClassVar[bool] = False
    # True for an adapter built to consume the batch's ``attn_bias`` (the xformers collator's mask);
    # "auto" prefers it for such batches (models.attention.auto_adapter).
    consumes_attn_bias: ClassVar[bool] = False
    # True for the one adapter that reads a context-parallel shard (``batch.context``): the others
    # would take its chunks for documents, so they refuse it.
    reads_context: ClassVar[bool] = False

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    @classmethod
    def available(cls, device: torch.device) -> bool:
        """Whether this adapter can run on ``device`` in this environment."""
        return device.type in cls.devices

    @classmethod
    def preferred(cls, device: torch.device) -> bool:
        """Whether ``"auto"`` may pick this adapter on ``device``."""
        return cls.available(device) and (cls.preferred_on is None or device.type in cls.preferred_on)

    def unsupported(self, *, causal: bool, grad: bool) -> str | None:
        """Why this adapter cannot compute this case on its device, or None if it can."""
        return None

    @property
    def backend(self) -> str:
        """The kernel that actually runs, for benchmark records."""
        return self.name

    def bind_head_dim(self, head_dim: int) -> None:
        """Told the model's head dimension before its first step (``GPT.adapter``): an adapter
        whose kernel depends on it checks and picks here. The others take every head dimension."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        if batch.context is not None and not self.reads_context:
            raise ValueError(f"attention adapter {self.name!r} cannot attend a context-parallel shard: its chunks are "
                             "parts of documents whose keys sit on other ranks; use attn='auto', which runs the "
                             "context-parallel attention for shards")
        reason = self.unsupported(causal=causal, grad=torch.is_grad_enabled() and q.requires_grad)
        if reason is not None:
            raise ValueError(f"attention adapter {self.name!r} on {q.device.type}: {reason}")
        return self.attend(q, k, v, batch, causal=causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        raise NotImplementedError

    def attend_packed(self, qkv: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        """Attention on qkv (..., 3, H, D), one projection's output; returns (..., H, D).

        An adapter whose kernel can write dq, dk and dv into one (..., 3, H, D) gradient overrides
        this (the ``qkv`` fusion); here it is ``self(*qkv.unbind(-3), ...)``, whose backward stacks
        the three gradients into one.
        """
        q, k, v = qkv.unbind(-3)
        return self(q, k, v, batch, causal=causal)
