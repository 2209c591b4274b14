"""One training sample: token ids and their next-token targets, parsed from what users hand a collator.

Accepted forms, all normalised to :class:`Sample`:

- token ids alone, as a 1-D integer ``torch.Tensor``, ``list`` or ``np.ndarray`` of length L.
  The targets are the ids shifted left by one; the last position has no target::

      [5, 6, 7]            ->  input_ids [5, 6, 7], labels [6, 7, -100]

- a ``dict`` with ``input_ids`` and optional ``labels``. ``labels`` are *aligned next-token
  targets* (``labels[i]`` is what position ``i`` must predict), as in the ``(inputs, targets)``
  pair below. Hugging Face's unshifted convention (``labels == input_ids``) is rejected, because
  training on it silently teaches the model to copy its input.
- an ``(inputs, targets)`` pair of equal-length sequences, as the seed article's dataset yields::

      ([5, 6, 7], [6, 7, 8])  ->  input_ids [5, 6, 7], labels [6, 7, 8]

Targets may hold the ignore index (-100 by default) where a position has nothing to predict.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100


class Sample(NamedTuple):
    """A validated sample.

    input_ids: (L,) int64, token ids, all >= 0, L >= 1
    labels:    (L,) int64, next-token targets, each >= 0 or equal to the ignore index
    """

    input_ids: Tensor
    labels: Tensor


def _as_ids(value: Any, index: int, what: str) -> Tensor:
    """Turn a tensor, list or ndarray into a 1-D int64 CPU tensor, or raise naming sample ``index``."""
    if isinstance(value, Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"sample {index}: {what} is an object array; token ids must be integers")
        t = torch.from_numpy(value)
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in value):
            bad = next(x for x in value if not isinstance(x, (int, np.integer)) or isinstance(x, bool))
            raise TypeError(
                f"sample {index}: {what} holds {bad!r} of type {type(bad).__name__}; "
                "token ids must be Python ints"
            )
        t = torch.tensor(value, dtype=torch.int64)
    else:
        raise TypeError(
            f"sample {index}: {what} is a {type(value).__name__}; expected a 1-D integer tensor, "
            "list or ndarray, a dict with 'input_ids', or an (inputs, targets) pair"
        )
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(
            f"sample {index}: {what} has dtype {t.dtype}; token ids must be integers, cast with .long()"
        )
    if t.dim() != 1:
        raise ValueError(
            f"sample {index}: {what} has shape {tuple(t.shape)}; expected 1-D token ids (seq_len,). "
            "Pass one sequence per sample, not a batch"
        )
    return t.to(device="cpu", dtype=torch.int64)


def is_pair(obj: Any) -> bool:
    """Whether ``obj`` is an ``(inputs, targets)`` pair of sequences, not a list of two token ids."""
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(x, (Tensor, np.ndarray, list, tuple)) for x in obj)
    )


def as_sample(obj: Any, index: int = 0, *, ignore_index: int = IGNORE_INDEX) -> Sample:
    """Parse and validate one sample; ``index`` is its position in the batch, used in errors.

    Example:
        >>> as_sample([5, 6, 7])
        Sample(input_ids=tensor([5, 6, 7]), labels=tensor([   6,    7, -100]))
    """
    labels: Tensor | None
    if isinstance(obj, dict):
        if "input_ids" not in obj:
            raise ValueError(f"sample {index}: dict has keys {sorted(obj)}; expected 'input_ids'")
        input_ids = _as_ids(obj["input_ids"], index, "input_ids")
        labels = _as_ids(obj["labels"], index, "labels") if obj.get("labels") is not None else None
        if labels is not None and len(labels) >= 2 and torch.equal(labels, input_ids):
            raise ValueError(
                f"sample {index}: labels equal input_ids, which is Hugging Face's unshifted convention; "
                "packing expects next-token targets (labels[i] = input_ids[i + 1]). "
                "Drop 'labels' to have them derived"
            )
    elif is_pair(obj):
        input_ids = _as_ids(obj[0], index, "inputs")
        labels = _as_ids(obj[1], index, "targets")
    else:
        input_ids = _as_ids(obj, index, "input_ids")
        labels = None

    n = len(input_ids)
    if n == 0:
        raise ValueError(
            f"sample {index} has length 0; every sample needs at least 1 token. "
            "Filter out empty documents before collating"
        )
    if labels is None:
        labels = torch.full_like(input_ids, ignore_index)
        labels[:-1] = input_ids[1:]
    elif len(labels) != n:
        raise ValueError(
            f"sample {index}: targets have length {len(labels)} but inputs have length {n}; "
            "they must be aligned one target per input"
        )
    low = int(input_ids.min())
    if low < 0:
        pos = int((input_ids < 0).nonzero()[0])
        raise ValueError(
            f"sample {index} has negative token id {low} (first at position {pos}); "
            "token ids must be >= 0"
        )
    bad = (labels < 0) & (labels != ignore_index)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0])
        raise ValueError(
            f"sample {index} has label {int(labels[pos])} at position {pos}; labels must be >= 0 "
            f"or the ignore index {ignore_index}"
        )
    return Sample(input_ids, labels)
