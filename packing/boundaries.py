"""Sequence boundaries: the one home of the arithmetic every layout, kernel and mask shares.

A packed row of ``num_slots`` positions holds the documents back to back, then an optional padding
tail. Everything downstream reads the same few facts, computed here and nowhere else:

- ``cumulative_lengths``: where each document starts and ends (``cu_seqlens``);
- ``packed_positions``: positions restarting at 0 per document;
- ``block_lengths`` / ``with_tail``: **the padding tail is one more block**, which attends only to
  itself, so no real token ever sees it (xFormers' mask, FlexAttention's document ids, the varlen
  kernels' boundaries and transformers' masks all rely on this rule);
- ``static_boundaries``: the fixed-length boundaries of a static-shape run, the tail cut into blocks
  of at most ``max_seqlen``, then empty sequences;
- ``block_causal_mask``: the (T, T) mask those boundaries imply, built on the device;
- ``host_to_device``: the copy that does not stall the host.

Worked example, documents of lengths 2, 3, 2 in a row of 9 slots::

    cumulative_lengths([2, 3, 2])              -> [0, 2, 5, 7]
    packed_positions([2, 3, 2])                -> [0, 1, 0, 1, 2, 0, 1]
    block_lengths([2, 3, 2], 9)                -> [2, 3, 2, 2]           the tail is a block
    static_boundaries([2, 3, 2], 9, 8, 3)      -> [0, 2, 5, 7, 9, 9, 9, 9]   tail, then empty

Examples:
    >>> with_tail(cumulative_lengths([2, 3]), num_tokens=5, num_slots=8).tolist()
    [0, 2, 5, 8]
    >>> static_boundaries([2, 3], num_slots=8, length=6, max_seqlen=2).tolist()
    [0, 2, 5, 7, 8, 8]
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def ceil_div(n, d):
    """``ceil(n / d)`` in integer arithmetic, for Python ints and numpy or torch integer arrays."""
    return -(-n // d)


def round_up(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple``; ``n`` itself when ``multiple`` is None."""
    return n if multiple is None else ceil_div(n, multiple) * multiple


def host_to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Copy a host tensor to ``device`` without stalling the host: on CUDA through pinned memory with
    ``non_blocking=True`` (a pageable copy waits for the GPU's queued work); elsewhere unchanged."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def cumulative_lengths(seq_lens: Sequence[int]) -> Tensor:
    """(num_seqs + 1,) int32 cumulative lengths starting at 0: lengths 2, 3, 2 give [0, 2, 5, 7]."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seq_lens).cumsum(0)
    return cu


def packed_positions(seq_lens: Sequence[int]) -> Tensor:
    """(num_tokens,) int64 positions restarting at 0 per sequence: 2, 3, 2 give [0, 1, 0, 1, 2, 0, 1]."""
    starts = cumulative_lengths(seq_lens)[:-1].long()
    return torch.arange(sum(seq_lens)) - torch.repeat_interleave(starts, torch.tensor(seq_lens))


def block_rows(lengths: Tensor, longest: int) -> Tensor:
    """(sum(lengths),) int64: where each token of consecutive documents of ``lengths`` (a host int
    tensor) sits in a (docs * longest) block, one document a row of ``longest`` slots: token t of
    document d at d * longest + (t - start[d]). ``to_blocks`` gathers by it, ``index_select`` back.

    Lengths 2, 3 with longest 3 give [0, 1, 3, 4, 5].
    """
    starts = lengths.cumsum(0) - lengths
    return torch.arange(int(lengths.sum())) + torch.repeat_interleave(torch.arange(len(lengths)) * longest - starts, lengths)


def to_blocks(x: Tensor, rows: Tensor, docs: int, longest: int) -> Tensor:
    """(T, H, D) tokens of consecutive documents -> (docs, H, longest, D), each document a row,
    padding slots zero; ``rows`` from :func:`block_rows` (on x's device), T its length."""
    flat = x.new_zeros(docs * longest, *x.shape[1:]).index_copy(0, rows, x)
    return flat.view(docs, longest, *x.shape[1:]).transpose(1, 2)


def block_lengths(seq_lens: Sequence[int], num_slots: int) -> list[int]:
    """The attention blocks of a packed row, host ints: the sequences, then the padding tail
    ``num_slots - sum(seq_lens)`` as one block of its own if the row is padded.

    Lengths 2, 3 in 8 slots give [2, 3, 3]; in 5 slots, [2, 3].
    """
    tail = num_slots - sum(seq_lens)
    return [*seq_lens, tail] if tail > 0 else list(seq_lens)


def with_tail(cu_seqlens: Tensor, num_tokens: int, num_slots: int) -> Tensor:
    """``cu_seqlens`` with the padding tail as one more block, on ``cu_seqlens``' device (no host
    read, no copy): [0, 2, 5] with 5 tokens in 8 slots gives [0, 2, 5, 8]."""
    return cu_seqlens if num_slots == num_tokens else F.pad(cu_seqlens, (0, 1), value=num_slots)


def static_length(max_seqs: int, total_tokens: int, max_seqlen: int) -> int:
    """Entries of static boundaries: room for ``max_seqs`` sequences, a padding tail of up to
    ``total_tokens`` slots in blocks of at most ``max_seqlen``, and the leading 0."""
    return max_seqs + ceil_div(total_tokens, max_seqlen) + 1


def static_boundaries(seq_lens: Sequence[int], num_slots: int, length: int, max_seqlen: int) -> Tensor:
    """(length,) int32 fixed-length sequence boundaries for a varlen kernel under static shapes.

    The sequences' boundaries come first, then the padding tail ``[num_tokens, num_slots)`` cut into
    blocks of at most ``max_seqlen`` slots (each attends only to itself, so real tokens never see
    it), then repeats of ``num_slots``: empty sequences, which a varlen kernel skips. Lengths 2, 3
    in 8 slots with length 6 and max_seqlen 2 give [0, 2, 5, 7, 8, 8].
    """
    cu = cumulative_lengths(seq_lens).tolist()
    while cu[-1] < num_slots:
        cu.append(min(cu[-1] + max_seqlen, num_slots))
    if len(cu) > length:
        raise ValueError(
            f"{len(seq_lens)} sequences and a padding tail of {num_slots - sum(seq_lens)} slots need "
            f"{len(cu)} boundaries > the static length {length}; raise max_seqs or cap the sampler's documents per batch"
        )
    return torch.tensor(cu + [num_slots] * (length - len(cu)), dtype=torch.int32)


def block_causal_mask(cu_seqlens: Tensor, num_slots: int, *, causal: bool = True, window: int | None = None) -> Tensor:
    """(T, T) bool on ``cu_seqlens``' device, True where query i may attend to key j: the same block
    of ``cu_seqlens`` and, if ``causal``, j <= i. Boundaries may repeat (empty blocks, as in static
    boundaries); slots past ``cu_seqlens[-1]`` form one block of their own (the tail rule).

    ``window``, a sliding window in transformers' definition (``sliding_window_overlay``: key j is
    seen by query i when ``j > i - window``, so ``window`` keys counting i itself), further keeps
    ``|i - j| < window``. Within one block the distance is the same as within the document alone.

    Boundaries [0, 2, 5] give rows [T F F F F], [T T F F F], [F F T F F], [F F T T F], [F F T T T].
    Built from the boundaries on the device, with no host read, so it also runs inside torch.compile.

    Examples:
        >>> block_causal_mask(torch.tensor([0, 1, 3], dtype=torch.int32), 4).int().tolist()
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
        >>> block_causal_mask(torch.tensor([0, 4], dtype=torch.int32), 4, window=2).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    index = torch.arange(num_slots, device=cu_seqlens.device)
    block = torch.searchsorted(cu_seqlens, index.to(cu_seqlens.dtype), right=True)  # (T,) block of each slot
    allowed = block[:, None] == block[None, :]
    distance = index[:, None] - index[None, :]  # i - j
    if causal:
        allowed &= distance >= 0
    if window is not None:
        if window < 1:
            raise ValueError(f"a sliding window covers at least the token itself: got window={window}, need >= 1")
        allowed &= distance.abs() < window
    return allowed
