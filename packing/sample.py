"""Training samples: token ids and their next-token targets, parsed from what users hand a collator.

Accepted forms, all normalised to :class:`Sample` (one document each):

- token ids alone, as a 1-D integer ``torch.Tensor``, ``list`` or ``np.ndarray`` of length L.
  The targets are the ids shifted left by one; the last position has no target::

      [5, 6, 7]            ->  input_ids [5, 6, 7], labels [6, 7, -100]

- an ``(inputs, targets)`` pair of equal-length sequences: targets already shifted, as the seed
  article's dataset yields::

      ([5, 6, 7], [6, 7, 8])  ->  input_ids [5, 6, 7], labels [6, 7, 8]

- a ``dict`` row, in the conventions of transformers and TRL (each key (L,) and aligned with
  ``input_ids``):

  ==================== ===========================================================================
  key                  meaning
  ==================== ===========================================================================
  ``input_ids``        the token ids (required)
  ``labels``           transformers' convention: **unshifted**, -100 where nothing is learned
                       (``labels[i]`` is the token at position i, predicted from position i - 1);
                       converted here to next-token targets
  ``targets``          next-token targets, already shifted (``targets[i]`` is what position i
                       predicts); not together with ``labels``
  ``attention_mask``   1 for a token, 0 for padding: left or right padding is stripped; a 0
                       between tokens is an error
  ``completion_mask``, 1 where the token is learned (TRL's prompt-completion and assistant-only
  ``assistant_masks``  rows); the rest of the row is context only
  ``position_ids``     a row already packed (transformers' ``DataCollatorWithFlattening``, TRL's
                       ``pack_dataset``): each restart at 0 begins a document, split apart here
  ``seq_lengths``      the same as a list of document lengths (TRL's ``pack_dataset``)
  ==================== ===========================================================================

  Labels under ``labels`` that look pre-shifted (every learned label is the *next* input id, not
  its own) are refused with the key to use. Values that are not sequences (an ``id`` string, the
  ``text`` a row was tokenized from) are metadata and pass unread; any other sequence-valued key
  is refused by name, since what it would change about training is unknown, unless the collator
  is told to ``ignore_keys``.

Example, a prompt-masked fine-tuning row and a tokenizer-padded one::

    {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]}  ->  labels [-100, 12, 13, -100]
    {"input_ids": [5, 6, 7, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}  ->  input_ids [5, 6, 7]

Targets may hold the ignore index (-100 by default) where a position has nothing to predict.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100

# The dict keys a row may carry, each read exactly as the module table says.
ROW_KEYS = ("input_ids", "labels", "targets", "attention_mask", "completion_mask", "assistant_masks",
            "position_ids", "seq_lengths")
LOSS_MASKS = ("completion_mask", "assistant_masks")


class Sample(NamedTuple):
    """A validated sample.

    input_ids: (L,) int64, token ids, all >= 0, L >= 1
    labels:    (L,) int64, next-token targets, each >= 0 or equal to the ignore index
    """

    input_ids: Tensor
    labels: Tensor


def _as_ids(value: Any, index: int, what: str, *, row: bool = False) -> Tensor:
    """Turn a tensor, list or ndarray into a 1-D int64 CPU tensor, or raise naming sample ``index``.
    ``row``: a dict row's value, where a (1, L) batch of one is taken as its one row."""
    if isinstance(value, Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"sample {index}: {what} is an object array; token ids must be integers")
        t = torch.from_numpy(value)
    elif isinstance(value, (list, tuple)):
        mask = what in _MASKS  # a mask may come as booleans; ids may not
        if not all(isinstance(x, (int, np.integer)) and (mask or not isinstance(x, bool)) for x in value):
            bad = next(x for x in value if not isinstance(x, (int, np.integer)) or (isinstance(x, bool) and not mask))
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
    if t.dtype.is_floating_point or t.dtype.is_complex or (t.dtype == torch.bool and what not in _MASKS):
        raise TypeError(
            f"sample {index}: {what} has dtype {t.dtype}; token ids must be integers, cast with .long()"
        )
    if row and t.dim() == 2 and t.shape[0] == 1:
        t = t[0]  # a collator's (1, L) output stored as a row: one row
    if t.dim() != 1:
        raise ValueError(
            f"sample {index}: {what} has shape {tuple(t.shape)}; expected 1-D token ids (seq_len,). "
            "Pass one sequence per sample, not a batch"
        )
    return t.to(device="cpu", dtype=torch.int64)


_MASKS = ("attention_mask",) + LOSS_MASKS


def is_pair(obj: Any) -> bool:
    """Whether ``obj`` is an ``(inputs, targets)`` pair of sequences, not a list of two token ids."""
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(x, (Tensor, np.ndarray, list, tuple)) for x in obj)
    )


def _is_data(value: Any) -> bool:
    """Whether a dict value is data a row would train on (a sequence), not metadata (a string, a number)."""
    return isinstance(value, (Tensor, np.ndarray, list, tuple))


def as_samples(obj: Any, index: int = 0, *, ignore_index: int = IGNORE_INDEX,
               ignore_keys: Iterable[str] = ()) -> list[Sample]:
    """Parse and validate one item: the documents it holds, in order (several for a packed row).

    ``index`` is the item's position in the batch, used in errors; ``ignore_keys`` names dict keys
    to pass unread (see the module docstring).

    Examples:
        >>> [s.input_ids.tolist() for s in as_samples({"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]})]
        [[5, 6], [7, 8]]
        >>> as_samples({"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]})[0].labels.tolist()
        [-100, 12, 13, -100]
    """
    if isinstance(obj, dict):
        return _from_row(obj, index, ignore_index, frozenset(ignore_keys))
    if is_pair(obj):
        return [_checked(_as_ids(obj[0], index, "inputs"), _as_ids(obj[1], index, "targets"), index, ignore_index)]
    return [_checked(_as_ids(obj, index, "input_ids"), None, index, ignore_index)]


def as_sample(obj: Any, index: int = 0, *, ignore_index: int = IGNORE_INDEX,
              ignore_keys: Iterable[str] = ()) -> Sample:
    """Parse and validate one sample that holds one document; ``index`` is its position in the batch.

    Examples:
        >>> as_sample([5, 6, 7])
        Sample(input_ids=tensor([5, 6, 7]), labels=tensor([   6,    7, -100]))
    """
    samples = as_samples(obj, index, ignore_index=ignore_index, ignore_keys=ignore_keys)
    if len(samples) != 1:
        raise ValueError(
            f"sample {index} is a packed row of {len(samples)} documents (its position_ids or seq_lengths say so); "
            "as_sample takes one document: use packing.sample.as_samples, or hand the row to a collator"
        )
    return samples[0]


def _from_row(row: dict, index: int, ignore_index: int, ignore_keys: frozenset[str]) -> list[Sample]:
    if "input_ids" not in row:
        raise ValueError(f"sample {index}: dict has keys {sorted(row)}; expected 'input_ids'")
    unknown = sorted(k for k, v in row.items() if k not in ROW_KEYS and k not in ignore_keys and _is_data(v))
    if unknown:
        raise ValueError(
            f"sample {index}: key {unknown[0]!r} holds a sequence packing does not read (it reads "
            f"{', '.join(ROW_KEYS)}); drop the column (dataset.remove_columns({unknown!r})), or pass "
            f"ignore_keys={unknown!r} to the collator if it carries nothing the model trains on"
        )
    ids = _as_ids(row["input_ids"], index, "input_ids", row=True)
    n = len(ids)
    fields = {k: _as_ids(row[k], index, k, row=True) for k in ROW_KEYS[1:-1] if row.get(k) is not None}
    for key, value in fields.items():
        if len(value) != n:
            raise ValueError(
                f"sample {index}: {key} has length {len(value)} but input_ids has length {n}; "
                "every per-token key must be aligned with input_ids"
            )
    if "labels" in fields and "targets" in fields:
        raise ValueError(
            f"sample {index} has both 'labels' (transformers' unshifted labels) and 'targets' (next-token targets); "
            "give one of them"
        )
    for key in _MASKS:
        if key in fields and bool(((fields[key] != 0) & (fields[key] != 1)).any()):
            bad = int(fields[key][(fields[key] != 0) & (fields[key] != 1)][0])
            raise ValueError(f"sample {index}: {key} holds {bad}; expected 0 and 1 only (1 = a token"
                             + (")" if key == "attention_mask" else " that is learned)"))
    if "targets" in fields:
        for key in LOSS_MASKS:
            if key in fields:
                raise ValueError(
                    f"sample {index} has {key!r} with 'targets': pre-shifted targets already say what is learned; "
                    f"put {ignore_index} in targets where nothing is, or give transformers' 'labels' with the mask"
                )
    if "attention_mask" in fields:
        ids, fields = _strip_padding(ids, fields, index)
    lengths = _document_lengths(row, fields, len(ids), index)
    starts = np.cumsum([0] + lengths[:-1]).tolist()
    if "labels" in fields:
        _refuse_preshifted(ids, fields["labels"], starts, lengths, index, ignore_index)
    samples = []
    for start, length in zip(starts, lengths):
        doc = slice(start, start + length)
        inputs = ids[doc]
        if "targets" in fields:
            targets = fields["targets"][doc].clone()
        else:
            # transformers' labels (or, without them, the ids) shifted left within the document:
            # position i predicts token i + 1; the document's last position predicts nothing.
            learned = fields["labels"][doc] if "labels" in fields else inputs
            targets = torch.full_like(inputs, ignore_index)
            targets[:-1] = learned[1:]
            for key in LOSS_MASKS:
                if key in fields:
                    keep = torch.zeros(length, dtype=torch.bool)
                    keep[:-1] = fields[key][doc][1:] == 1
                    targets[~keep] = ignore_index
        samples.append(_checked(inputs, targets, index, ignore_index))
    return samples


def _strip_padding(ids: Tensor, fields: dict[str, Tensor], index: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The tokens where attention_mask is 1: left or right padding dropped, a hole refused."""
    mask = fields.pop("attention_mask")
    real = mask.nonzero()[:, 0]
    if len(real) == 0:
        raise ValueError(
            f"sample {index}: attention_mask is all 0 ({len(mask)} positions), so it holds no token; "
            "filter out empty rows before collating"
        )
    first, last = int(real[0]), int(real[-1])
    if len(real) != last - first + 1:
        hole = first + int((mask[first:last + 1] == 0).nonzero()[0, 0])
        raise ValueError(
            f"sample {index}: attention_mask is 0 at position {hole}, between tokens at {first} and {last}; only "
            "left or right padding can be stripped. For a row of several documents, give position_ids or seq_lengths"
        )
    return ids[first:last + 1], {k: v[first:last + 1] for k, v in fields.items()}


def _document_lengths(row: dict, fields: dict[str, Tensor], n: int, index: int) -> list[int]:
    """The lengths of the documents in a row: from seq_lengths, from position_ids, or one document."""
    lengths = None
    if row.get("seq_lengths") is not None:
        given = _as_ids(row["seq_lengths"], index, "seq_lengths", row=True)
        if len(given) == 0 or bool((given < 1).any()) or int(given.sum()) != n:
            raise ValueError(
                f"sample {index}: seq_lengths {given.tolist()[:8]}{'...' if len(given) > 8 else ''} (sum "
                f"{int(given.sum())}) must be lengths >= 1 that add up to the row's {n} tokens"
            )
        lengths = given.tolist()
    if "position_ids" in fields:
        pos = fields["position_ids"]
        restart = pos == 0
        # What each position must be: its distance from the last restart at or before it.
        at = torch.arange(n)
        expected = at - torch.cummax(torch.where(restart, at, 0), 0).values
        bad = pos != expected
        if bool(bad.any()):
            p = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sample {index}: position_ids is {int(pos[p])} at position {p}"
                + (f" after {int(pos[p - 1])}" if p else "")
                + "; packing reads position_ids only as document boundaries: each document counts 0, 1, 2, ... "
                "(drop position_ids for a single document)"
            )
        starts = restart.nonzero()[:, 0].tolist() + [n]
        from_positions = [b - a for a, b in zip(starts[:-1], starts[1:])]
        if lengths is not None and lengths != from_positions:
            raise ValueError(
                f"sample {index}: seq_lengths {lengths} and position_ids (documents of {from_positions}) disagree; "
                "give one of them"
            )
        lengths = from_positions
    return lengths if lengths is not None else [n]


def _refuse_preshifted(ids: Tensor, labels: Tensor, starts: list[int], lengths: list[int], index: int,
                       ignore_index: int) -> None:
    """A ValueError when labels under 'labels' are next-token targets already: every learned label
    that has a next token in its document is that next input id, and not every one is its own id
    (labels that fit both, as in a run of one repeated token, are taken as transformers' own)."""
    learned = labels != ignore_index
    has_next = torch.ones_like(learned)
    has_next[[s + n - 1 for s, n in zip(starts, lengths)]] = False
    checked = (learned & has_next)[:-1]
    if not bool(checked.any()):
        return
    next_ids = bool((labels[:-1][checked] == ids[1:][checked]).all())
    own_ids = bool((labels[learned] == ids[learned]).all())
    if next_ids and not own_ids:
        raise ValueError(
            f"sample {index}: its 'labels' look pre-shifted (every learned label is the next input id, not its own); "
            "'labels' means transformers' unshifted labels. Put next-token targets under 'targets' instead, or pass "
            "an (inputs, targets) pair"
        )


def _checked(input_ids: Tensor, labels: Tensor | None, index: int, ignore_index: int) -> Sample:
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
