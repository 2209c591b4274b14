"""A DataLoader built in one call from a dataset, a sampler and a collator, checked to agree.

A sampler budgets each batch (``max_tokens``); the collator decides how many slots the batch
really takes. When the two round or pad differently the budget silently stops holding: a
``LengthBucketSampler(max_tokens=128)`` without the collator's ``pad_to_multiple_of=64`` plans
batches of 128 one-token documents that ``PadToLongest`` then pads to 128 x 64 slots. ``make_loader``
refuses every such pair up front, naming both settings:

=========================  ======================================  =====================================
sampler                    collator                                must hold
=========================  ======================================  =====================================
``LengthBucketSampler``    ``pad_longest``                         the sampler rounds to a multiple of the
                                                                   collator's ``pad_to_multiple_of``
``LengthBucketSampler``    ``pad_max``                             the sampler rounds to a multiple of
                                                                   ``max_len`` (every row is padded to it)
``PackingSampler``         ``pad_longest``, ``pad_max``            refused: packs are budgeted in real
                                                                   tokens, padded rows in count x longest
either                     ``concat``/``xformers`` (or             ``max_tokens <= total_tokens``; at most
                           ``pack(model)``), static                ``max_seqs`` documents per batch, none
                                                                   longer than ``max_seqlen``
=========================  ======================================  =====================================

Examples:
    >>> from packing import LengthBucketSampler, PadToLongest
    >>> lengths = [1] * 128
    >>> make_loader(lengths, LengthBucketSampler(lengths, max_tokens=128), PadToLongest(64))
    Traceback (most recent call last):
    ...
    ValueError: LengthBucketSampler(pad_to_multiple_of=1) budgets max_tokens=128 for rows rounded to 1, but PadToLongest(pad_to_multiple_of=64) pads them to a multiple of 64: a batch could take 8192 slots; give the sampler pad_to_multiple_of=64
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from packing.collate import ConcatCuSeqlens, PadToLongest, PadToMax
from packing.sampling.samplers import LengthBucketSampler, PackingSampler

__all__ = ["check_budget", "make_loader"]


def make_loader(dataset: Any, sampler: Any, collator: Any, **options: Any) -> DataLoader:
    """``DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, **options)`` once
    :func:`check_budget` has found the sampler and the collator agree, and the sampler's lengths
    cover the dataset one for one."""
    check_budget(sampler, collator)
    lengths = getattr(sampler, "lengths", None)
    if lengths is not None and hasattr(dataset, "__len__") and len(lengths) != len(dataset):
        raise ValueError(
            f"the sampler has {len(lengths)} lengths but the dataset has {len(dataset)} items; build the sampler "
            "from this dataset's lengths"
        )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, **options)


def check_budget(sampler: Any, collator: Any) -> None:
    """A ValueError when a batch ``sampler`` plans could take more slots (or more documents) in
    ``collator``'s layout than the sampler budgeted; samplers and collators of other kinds pass."""
    inner = getattr(collator, "collator", collator)  # pack(model) lays out with a ConcatCuSeqlens
    kind = type(sampler).__name__
    if isinstance(sampler, LengthBucketSampler):
        rounding = sampler.pad_to_multiple_of
        if isinstance(inner, PadToLongest):
            theirs = inner.pad_to_multiple_of or 1
            if rounding % theirs:
                worst = (sampler.max_tokens // rounding) * (-(-rounding // theirs) * theirs)
                raise ValueError(
                    f"{kind}(pad_to_multiple_of={rounding}) budgets max_tokens={sampler.max_tokens} for rows rounded to "
                    f"{rounding}, but PadToLongest(pad_to_multiple_of={theirs}) pads them to a multiple of {theirs}: "
                    f"a batch could take {worst} slots; give the sampler pad_to_multiple_of={theirs}"
                )
        if isinstance(inner, PadToMax) and rounding % inner.max_len:
            raise ValueError(
                f"PadToMax(max_len={inner.max_len}) pads every row to {inner.max_len} slots, but {kind}"
                f"(pad_to_multiple_of={rounding}) budgets max_tokens={sampler.max_tokens} for rows of their longest "
                f"document; give the sampler pad_to_multiple_of={inner.max_len}, or collate with PadToLongest"
            )
    if isinstance(sampler, PackingSampler) and isinstance(inner, (PadToLongest, PadToMax)):
        raise ValueError(
            f"PackingSampler(max_tokens={sampler.max_tokens}) budgets real tokens, but {type(inner).__name__} pads "
            "every document of a batch to one width, which can take many times the budget; use "
            "LengthBucketSampler for padded layouts, or a packed collator (concat, xformers, nested)"
        )
    if isinstance(inner, ConcatCuSeqlens):
        _check_packed(sampler, inner, kind)


def _check_packed(sampler: Any, collator: ConcatCuSeqlens, kind: str) -> None:
    if collator.total_tokens is not None and getattr(sampler, "max_tokens", 0) > collator.total_tokens:
        raise ValueError(
            f"{kind}(max_tokens={sampler.max_tokens}) plans batches of more tokens than the collator's "
            f"total_tokens={collator.total_tokens}; give both the same budget"
        )
    if collator.max_seqs is None:
        return
    # The sampler's cap on documents a batch: PackingSampler's max_seqs, LengthBucketSampler's max_batch_size.
    option = next((name for cls, name in ((PackingSampler, "max_seqs"), (LengthBucketSampler, "max_batch_size"))
                   if isinstance(sampler, cls)), None)
    most = getattr(sampler, option) if option else None
    if option and (most is None or most > collator.max_seqs):
        raise ValueError(
            f"the collator takes at most max_seqs={collator.max_seqs} documents a batch, but {kind}({option}={most}) "
            f"may put more in one; give the sampler {option}={collator.max_seqs}"
        )
    lengths = getattr(sampler, "lengths", None)
    if lengths is not None and len(lengths) and int(max(lengths)) > collator.max_seqlen:
        raise ValueError(
            f"the sampler's longest document has {int(max(lengths))} tokens > the collator's max_seqlen="
            f"{collator.max_seqlen}; raise max_seqlen, or split long documents (packing.SplitDocuments)"
        )
