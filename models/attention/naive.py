"""``naive``: the fp32 ground truth, one sequence at a time, for any layout."""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from models.attention.base import AttentionAdapter
from packing.batch import LAYOUTS, Batch


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

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
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
