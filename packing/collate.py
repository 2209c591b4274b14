"""Collators: a list of samples in, one :class:`~packing.batch.Batch` out.

=================  ==========  ===================================================================
name               layout      what the model computes
=================  ==========  ===================================================================
``pad_max``        padded      B x max_len, whatever the batch holds (the seed article's baseline)
``pad_longest``    padded      B x (longest, rounded up to ``pad_to_multiple_of``)
``nested``         nested      exactly the real tokens, as jagged NestedTensors
``concat``         packed      one row of all tokens plus ``cu_seqlens`` (flash-attn varlen)
``xformers``       packed      ``concat`` plus an xFormers ``BlockDiagonalMask``
=================  ==========  ===================================================================

Every collator accepts the sample forms documented in :mod:`packing.sample`, is a plain picklable
object (DataLoader workers copy it), and does all its work on the host, so the batch carries host
ints (``seq_lens``, ``max_seqlen``, ``num_targets``) that the model reads without a device sync.

Examples:
    >>> from torch.utils.data import DataLoader
    >>> from packing import get_collator
    >>> loader = DataLoader([[5, 6, 7], [8, 9]], batch_size=2, collate_fn=get_collator("concat"))
    >>> next(iter(loader)).cu_seqlens
    tensor([0, 3, 5], dtype=torch.int32)
"""

from __future__ import annotations

import inspect

import logging
from typing import Any, ClassVar, Sequence

import torch

from packing.batch import Batch
from packing.boundaries import (
    block_lengths,
    cumulative_lengths,
    packed_positions,
    round_up,
    static_boundaries,
    static_length,
)
from packing.sample import IGNORE_INDEX, Sample, as_samples
from packing.validate import positive_int


class Collator:
    """Base class: parses and validates samples, then lays them out with :meth:`collate`."""

    name: ClassVar[str]
    layout: ClassVar[str]

    def __init__(self, *, pad_id: int = 0, ignore_index: int = IGNORE_INDEX, ignore_keys: Sequence[str] = ()) -> None:
        if not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id is {pad_id!r}; expected an int >= 0 (it is embedded like any token)")
        if isinstance(ignore_keys, str):
            raise TypeError(f"ignore_keys takes a sequence of key names, got the string {ignore_keys!r}; "
                            f"write [{ignore_keys!r}]")
        self.pad_id = pad_id
        self.ignore_index = ignore_index
        self.ignore_keys = tuple(ignore_keys)

    def __call__(self, samples: Sequence[Any]) -> Batch:
        if len(samples) == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch (0 samples); pass at least one sample")
        # A packed row (position_ids or seq_lengths) is split back into its documents here, so every
        # layout sees documents, never a row of several.
        parsed = [doc for i, s in enumerate(samples)
                  for doc in as_samples(s, i, ignore_index=self.ignore_index, ignore_keys=self.ignore_keys)]
        return self.collate(parsed)

    def collate(self, samples: list[Sample]) -> Batch:
        raise NotImplementedError

    def _batch(self, lens: list[int], cu_seqlens: Any = None, **fields: Any) -> Batch:
        """The Batch of sequences of lengths ``lens`` in this collator's layout, from its tensors
        (``cu_seqlens`` when the collator already computed them)."""
        cu = cumulative_lengths(lens) if cu_seqlens is None else cu_seqlens
        return Batch(layout=self.layout, seq_lens=tuple(lens), cu_seqlens=cu, ignore_index=self.ignore_index, **fields)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class _Padded(Collator):
    layout = "padded"

    def _pad(self, samples: list[Sample], L: int) -> Batch:
        lens = [len(s.input_ids) for s in samples]
        B = len(samples)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.int64)
        labels = torch.full((B, L), self.ignore_index, dtype=torch.int64)
        for b, (s, n) in enumerate(zip(samples, lens)):
            input_ids[b, :n] = s.input_ids
            labels[b, :n] = s.labels
        mask = torch.arange(L) < torch.tensor(lens)[:, None]  # (B, L), right padding
        position_ids = torch.arange(L).expand(B, L) * mask  # padding gets position 0, a valid index
        return self._batch(lens, input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=mask)


class PadToMax(_Padded):
    """Pad every sequence to ``max_len``: (B, max_len). The seed article's baseline.

    A sequence longer than ``max_len`` is an error, never truncated.
    """

    name = "pad_max"

    def __init__(self, max_len: int, *, pad_id: int = 0, ignore_index: int = IGNORE_INDEX,
                 ignore_keys: Sequence[str] = ()) -> None:
        super().__init__(pad_id=pad_id, ignore_index=ignore_index, ignore_keys=ignore_keys)
        positive_int("max_len", max_len)
        self.max_len = max_len

    def collate(self, samples: list[Sample]) -> Batch:
        for i, s in enumerate(samples):
            if len(s.input_ids) > self.max_len:
                raise ValueError(
                    f"sample {i} has length {len(s.input_ids)} > max_len {self.max_len}; "
                    "raise max_len or split the document before collating"
                )
        return self._pad(samples, self.max_len)


class PadToLongest(_Padded):
    """Pad to the longest sequence in the batch, rounded up to ``pad_to_multiple_of``: (B, L).

    The default of 64 bounds the number of distinct widths to max_len / 64: the first step at a new
    width is slow (kernel selection, allocator growth), and exact widths were slower even once each
    had been seen (``python -m benchmarks.varlen --pad-to-multiple-of 1`` measures it). ``pad_to_multiple_of=None`` pads to the
    exact longest.
    """

    name = "pad_longest"

    def __init__(
        self, pad_to_multiple_of: int | None = 64, *, pad_id: int = 0, ignore_index: int = IGNORE_INDEX,
        ignore_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(pad_id=pad_id, ignore_index=ignore_index, ignore_keys=ignore_keys)
        positive_int("pad_to_multiple_of", pad_to_multiple_of, optional=True)
        self.pad_to_multiple_of = pad_to_multiple_of

    def collate(self, samples: list[Sample]) -> Batch:
        longest = max(len(s.input_ids) for s in samples)
        return self._pad(samples, round_up(longest, self.pad_to_multiple_of))


class NestedJagged(Collator):
    """Jagged NestedTensors (B, j): no padding at all.

    ``input_ids``, ``labels`` and ``position_ids`` share one offsets tensor and carry
    ``min_seqlen``/``max_seqlen``, so kernels never read the lengths back from the device.
    """

    name = "nested"
    layout = "nested"

    def collate(self, samples: list[Sample]) -> Batch:
        lens = [len(s.input_ids) for s in samples]
        cu = cumulative_lengths(lens)
        offsets = cu.long()  # torch.nested wants int64 offsets; cu_seqlens stays int32 per the contract
        values = {
            "input_ids": torch.cat([s.input_ids for s in samples]),
            "labels": torch.cat([s.labels for s in samples]),
            "position_ids": packed_positions(lens),
        }
        nested = {
            k: torch.nested.nested_tensor_from_jagged(v, offsets, min_seqlen=min(lens), max_seqlen=max(lens))
            for k, v in values.items()
        }
        return self._batch(lens, cu, **nested)


class _TorchsOwnDeprecation(logging.Filter):
    """torch's ``nested_tensor_from_jagged`` calls its own deprecated ``is_fx_tracing()``, which logs
    "is_fx_tracing will return true for both fx.symbolic_trace and torch.export..." on the first
    nested batch (torch 2.13; nothing the caller can change). Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("is_fx_tracing will return true")


logging.getLogger("torch.fx._symbolic_trace").addFilter(_TorchsOwnDeprecation())


class ConcatCuSeqlens(Collator):
    """All sequences concatenated into one row (1, T), with ``cu_seqlens`` marking the boundaries.

    This is the layout of flash-attn's ``flash_attn_varlen_func`` and torch's ``varlen_attn``.
    For static shapes, pad the row with ``pad_to_multiple_of`` or to a fixed ``total_tokens``; the
    padding lies past ``cu_seqlens[-1]``, so no real token attends to it.

    Fully static shapes, so that ``torch.compile(dynamic=False)`` compiles once and CUDA graphs can
    replay: give ``total_tokens``, ``max_seqs`` and ``max_seqlen``. Then every batch also carries
    ``static_cu_seqlens`` of one fixed length, ``max_seqs + ceil(total_tokens / max_seqlen) + 1``,
    and the constant ``static_max_seqlen = max_seqlen``; the ``flash`` adapter hands those to the
    kernel instead of the per-batch ones, over the whole padded row.

    Examples:
        >>> c = ConcatCuSeqlens(total_tokens=8, max_seqs=4, max_seqlen=3)
        >>> c([[5, 6], [7, 8, 9], [1, 2]]).static_cu_seqlens.tolist()
        [0, 2, 5, 7, 8, 8, 8, 8]
    """

    name = "concat"
    layout = "packed"

    def __init__(
        self,
        *,
        pad_to_multiple_of: int | None = None,
        total_tokens: int | None = None,
        max_seqs: int | None = None,
        max_seqlen: int | None = None,
        pad_id: int = 0,
        ignore_index: int = IGNORE_INDEX,
        ignore_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(pad_id=pad_id, ignore_index=ignore_index, ignore_keys=ignore_keys)
        for name, value in (("pad_to_multiple_of", pad_to_multiple_of), ("total_tokens", total_tokens),
                            ("max_seqs", max_seqs), ("max_seqlen", max_seqlen)):
            positive_int(name, value, optional=True)
        if pad_to_multiple_of is not None and total_tokens is not None:
            raise ValueError(
                f"pad_to_multiple_of={pad_to_multiple_of} and total_tokens={total_tokens} both set; "
                "choose one way to pad the row"
            )
        if (max_seqs is None) != (max_seqlen is None) or (max_seqs is not None and total_tokens is None):
            raise ValueError(
                f"max_seqs={max_seqs}, max_seqlen={max_seqlen}, total_tokens={total_tokens}: static shapes "
                "need all three (the row length, the most sequences and the longest sequence per batch)"
            )
        self.pad_to_multiple_of = pad_to_multiple_of
        self.total_tokens = total_tokens
        self.max_seqs = max_seqs
        self.max_seqlen = max_seqlen

    @property
    def static_length(self) -> int | None:
        """Entries of ``static_cu_seqlens``: room for ``max_seqs`` sequences, the padding tail in
        blocks of at most ``max_seqlen``, and the leading 0; None without static shapes."""
        if self.max_seqs is None:
            return None
        return static_length(self.max_seqs, self.total_tokens, self.max_seqlen)

    def _row_length(self, num_tokens: int) -> int:
        if self.total_tokens is None:
            return round_up(num_tokens, self.pad_to_multiple_of)
        if num_tokens > self.total_tokens:
            raise ValueError(
                f"batch has {num_tokens} tokens > total_tokens {self.total_tokens}; "
                "raise total_tokens or put fewer tokens in each batch"
            )
        return self.total_tokens

    def _static(self, lens: list[int], T: int) -> dict[str, Any]:
        if self.max_seqs is None:
            return {}
        if len(lens) > self.max_seqs:
            raise ValueError(
                f"batch has {len(lens)} sequences > max_seqs {self.max_seqs}; raise max_seqs or cap the "
                "sampler's documents per batch (PackingSampler(max_seqs=...))"
            )
        if max(lens) > self.max_seqlen:
            raise ValueError(
                f"batch holds a sequence of length {max(lens)} > max_seqlen {self.max_seqlen}; "
                "raise max_seqlen or split long documents (packing.SplitDocuments)"
            )
        return {
            "static_cu_seqlens": static_boundaries(lens, T, self.static_length, self.max_seqlen),
            "static_max_seqlen": self.max_seqlen,
        }

    def collate(self, samples: list[Sample]) -> Batch:
        lens = [len(s.input_ids) for s in samples]
        N = sum(lens)
        T = self._row_length(N)
        input_ids = torch.full((1, T), self.pad_id, dtype=torch.int64)
        labels = torch.full((1, T), self.ignore_index, dtype=torch.int64)
        position_ids = torch.zeros((1, T), dtype=torch.int64)
        torch.cat([s.input_ids for s in samples], out=input_ids[0, :N])
        torch.cat([s.labels for s in samples], out=labels[0, :N])
        position_ids[0, :N] = packed_positions(lens)
        return self._batch(lens, input_ids=input_ids, labels=labels, position_ids=position_ids,
                           attn_bias=self._bias(lens, T), **self._static(lens, T))

    def _bias(self, lens: list[int], num_slots: int) -> Any:
        return None


def block_diagonal_mask_class() -> type:
    """xFormers' ``BlockDiagonalMask``, from ``xformers`` or from ``mslk`` (the same kernels, packaged
    for torch 2.11, where xFormers 0.0.35's own ops fail to load)."""
    # xFormers logs a multi-line warning on import when its CUDA kernels do not match torch (always,
    # on a CPU machine). The mask is pure Python and needs no kernel, so that warning is noise here.
    xformers_log = logging.getLogger("xformers")
    level = xformers_log.level
    xformers_log.setLevel(logging.ERROR)
    try:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError:
        try:
            from mslk.attention.fmha.attn_bias import BlockDiagonalMask
        except ImportError:
            raise ImportError(
                "the xformers collator needs xFormers' BlockDiagonalMask: pip install 'varlen-packing[xformers]' "
                "(or mslk-cuda on torch 2.11)"
            ) from None
    finally:
        xformers_log.setLevel(level)
    return BlockDiagonalMask


class XformersBlockDiagonal(ConcatCuSeqlens):
    """``concat`` plus ``attn_bias``, an xFormers ``BlockDiagonalMask`` built on the host.

    A padded tail becomes one more block, so it attends only to itself and no real token sees it.
    Making the mask causal (``make_causal()``) is the attention adapter's business.
    """

    name = "xformers"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        block_diagonal_mask_class()  # fail at construction, not in a DataLoader worker

    def _bias(self, lens: list[int], num_slots: int) -> Any:
        # device="cpu" explicitly: xFormers (and mslk) default to CUDA whenever it is available and
        # pin memory on the way, which breaks the host-side contract and crashes in a forked
        # DataLoader worker ("Cannot re-initialize CUDA in forked subprocess").
        return block_diagonal_mask_class().from_seqlens(block_lengths(lens, num_slots), device=torch.device("cpu"))


COLLATORS: dict[str, type[Collator]] = {
    cls.name: cls for cls in (PadToMax, PadToLongest, NestedJagged, ConcatCuSeqlens, XformersBlockDiagonal)
}


def get_collator(name: str, **options: Any) -> Collator:
    """Build a collator by name: ``pad_max``, ``pad_longest``, ``nested``, ``concat`` or ``xformers``.

    Examples:
        >>> get_collator("pad_longest", pad_to_multiple_of=8)
        PadToLongest(pad_id=0, ignore_index=-100, ignore_keys=(), pad_to_multiple_of=8)
    """
    if name not in COLLATORS:
        raise ValueError(f"unknown collator {name!r}; known collators: {', '.join(COLLATORS)}")
    params = inspect.signature(COLLATORS[name]).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())  # forwards its options (xformers)
    unknown = [] if open_ended else sorted(set(options) - set(params))
    if unknown:
        raise TypeError(f"get_collator({name!r}) takes no option {unknown[0]!r}; its options: {', '.join(params)}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in options
               and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    if missing:
        raise TypeError(
            f"get_collator({name!r}) needs the option {missing[0]}=...; e.g. get_collator({name!r}, {missing[0]}=1024)"
            + (": the fixed row length every sample is padded to" if missing[0] == "max_len" else "")
        )
    return COLLATORS[name](**options)
