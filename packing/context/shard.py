"""One context-parallel rank's part of a packed row, as a :class:`~packing.batch.Batch`, and back.

:func:`shard` cuts a packed batch (one row) by a :class:`~packing.context.layout.ContextLayout`:
the rank's chunks become its row, each chunk one sequence of the shard's ``cu_seqlens``. Everything
that must not change with the cut is taken from the whole row first:

- ``position_ids``: a chunk that starts inside a document keeps the document's positions;
- ``labels``: next-token targets were set on the whole row, so a chunk's last token keeps the
  target that lies on another rank, and no target crosses a document;
- the loss denominator: ``batch.context.num_targets`` counts the whole row's targets, so each
  rank's loss is its sum of cross-entropy over that count, and the ranks' gradients add up to the
  row's.

:class:`ContextShard` (``batch.context``) carries what the attention needs, computed on the host:
for each local chunk, the keys it attends to (its block's prefix up to the chunk's end; the whole
block when bidirectional) as indices into ``[all-gathered cut-block tokens, local tokens]``, with
their ``cu_seqlens`` and longest length.

Examples:
    >>> from packing import get_collator
    >>> from packing.context.layout import plan_layout
    >>> batch = get_collator("concat")([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]])
    >>> layout = plan_layout(batch_blocks(batch), world_size=2, split_tokens=8)
    >>> shards = [shard(batch, layout, r) for r in range(2)]
    >>> [s.input_ids.tolist() for s in shards]
    [[[1, 2, 7, 8, 9, 10]], [[3, 4, 5, 6]]]
    >>> [s.position_ids.tolist() for s in shards]
    [[[0, 1, 6, 7, 0, 1]], [[2, 3, 4, 5]]]
    >>> [s.labels.tolist() for s in shards]
    [[[2, 3, 8, -100, 10, -100]], [[4, 5, 6, 7]]]
    >>> torch.equal(unshard([s.input_ids for s in shards], layout), batch.input_ids)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from packing.batch import Batch
from packing.boundaries import block_lengths, cumulative_lengths, packed_positions
from packing.context.layout import ContextLayout


@dataclass(frozen=True, eq=False)
class KernelCalls:
    """How a varlen kernel runs a shard's chunks (one causality) without copying the keys of whole
    blocks, and each cut chunk's keys picked straight into its call.

    The local row is the cut blocks' chunks (its first ``split_len`` tokens, all-gathered), then the
    whole blocks. The whole blocks run in one call on the local q, k and v as they are: each block
    is one sequence, its queries its keys. The cut blocks' chunks read keys that other ranks hold,
    picked from the all-gathered tokens. A block cut head-and-tail gives a rank two chunks whose keys
    are both a prefix of the block, so they run in two calls (a block has at most one chunk a call;
    call k takes each block's chunk with the k-th shortest keys): in each call a sequence is one
    chunk, its queries a slice of the local row and its keys the block's start up to the chunk's
    end, picked for that call alone. Every key a call is given is read: a call holds no keys that
    only another call's chunks read (which the kernel's backward would still visit and write).

    Fields (W the local whole blocks; per cut call c, S_c sequences, Q_c queries and K_c keys):
        whole_cu: (W + 1,) int32 cumulative lengths of the whole blocks (queries and keys alike),
            from the local row's ``split_len``; None when the rank holds no whole block.
        whole_max: the longest whole block (0 when none).
        keys: per cut call, (K_c,) int64 indices into the all-gathered tokens, its chunks' keys in
            order.
        q_index: per cut call, (Q_c,) int64 local query rows, in the call's sequence order.
        cu_q, cu_k: per cut call, (S_c + 1,) int32 cumulative query and key lengths.
        max_q, max_k: per cut call, the longest sequence's queries and keys (host ints).
        order: (split_len,) int64: the cut calls' outputs, concatenated, back in local order.
        in_order: whether the cut calls' queries are consecutive slices of the local row, in call
            order (a rank's head chunks, then its tail chunks, as :func:`plan_layout` lists them):
            then each call takes its slice of q, and the outputs need no reordering.

    Example: one 16-token document and a 2-token one on 2 ranks. Rank 0 holds the chunks [0, 4)
    and [12, 16) of the first; their keys are [0, 4) and [0, 16), and the all-gather puts rank 0's
    cut tokens at slots 0-7 and rank 1's at 8-15, so ``keys`` is ([0, 1, 2, 3], [0, 1, 2, 3, 8, ...,
    15, 4, 5, 6, 7]), ``cu_q`` ([0, 4], [0, 4]) and ``cu_k`` ([0, 4], [0, 16]).
    """

    whole_cu: Tensor | None
    whole_max: int
    keys: tuple[Tensor, ...]
    q_index: tuple[Tensor, ...]
    cu_q: tuple[Tensor, ...]
    cu_k: tuple[Tensor, ...]
    max_q: tuple[int, ...]
    max_k: tuple[int, ...]
    order: Tensor
    in_order: bool

    def map(self, fn) -> KernelCalls:
        return KernelCalls(None if self.whole_cu is None else fn(self.whole_cu), self.whole_max, tuple(fn(t) for t in self.keys),
                           tuple(fn(t) for t in self.q_index), tuple(fn(t) for t in self.cu_q),
                           tuple(fn(t) for t in self.cu_k), self.max_q, self.max_k, fn(self.order), self.in_order)


@dataclass(frozen=True, eq=False)
class ContextShard:
    """What rank ``rank`` needs beyond its tokens to attend exactly (``Batch.context``).

    Fields (C local chunks; K the keys of all of them together; G = world_size x
    ``layout.gather_len``, the all-gather's tokens; the first ``layout.split_len(rank)`` local tokens
    are this rank's contribution, padded to ``gather_len``):
        layout: the row's :class:`ContextLayout` (world size, blocks, every rank's chunks, version).
        rank: this shard's rank.
        num_tokens: the whole row's real tokens (its documents; the rest is the padding tail).
        num_targets: the whole row's targets: the loss denominator every rank uses.
        key_index: per causality, (K,) int64 indices into the (G + local tokens) key source, each
            chunk's keys in order: causal, its block from the start to the chunk's end;
            bidirectional, its whole block (the masked path's keys).
        kernel_calls: per causality, :class:`KernelCalls`: a varlen kernel's calls over the chunks,
            the whole blocks' keys not copied and each cut chunk's picked into its call.
        regather: whether the attention's backward all-gathers the keys and values again instead
            of keeping them from the forward (its forward is recomputed): the memory of the gathered
            keys, every layer, against one more forward of the attention.
    """

    layout: ContextLayout
    rank: int
    num_tokens: int
    num_targets: int
    key_index: dict[bool, Tensor]
    kernel_calls: dict[bool, KernelCalls]
    regather: bool = False

    def map(self, fn) -> ContextShard:
        """The same shard with ``fn`` applied to its tensors (``Batch.to``, ``pin_memory``)."""
        return ContextShard(self.layout, self.rank, self.num_tokens, self.num_targets,
                            {c: fn(t) for c, t in self.key_index.items()},
                            {c: calls.map(fn) for c, calls in self.kernel_calls.items()}, self.regather)

    @property
    def gather_len(self) -> int:
        """Tokens each rank contributes to the all-gather (:attr:`ContextLayout.gather_len`)."""
        return self.layout.gather_len

    def positions(self) -> Tensor:
        """(local tokens,) int64: the whole row's positions at this rank's tokens."""
        whole = torch.zeros(self.layout.num_slots, dtype=torch.int64)
        lens = self.layout.block_lens
        docs = lens if sum(lens) == self.num_tokens else lens[:-1]  # the last block is the padding tail
        whole[: self.num_tokens] = packed_positions(docs)
        return whole[local_index(self.layout, self.rank)]


def batch_blocks(batch: Batch) -> list[int]:
    """The blocks of a packed batch's row: its sequences, then the padding tail if any."""
    return block_lengths(batch.seq_lens, batch.num_slots)


def local_index(layout: ContextLayout, rank: int) -> Tensor:
    """(local tokens,) int64: the row positions rank ``rank`` holds, in its order."""
    chunks = layout.chunks[rank]
    return torch.cat([torch.arange(c.start, c.end) for c in chunks]) if chunks else torch.zeros(0, dtype=torch.int64)


def shard(batch: Batch, layout: ContextLayout, rank: int, *, regather: bool = False) -> Batch:
    """Rank ``rank``'s part of the packed ``batch`` (one row), by ``layout`` (from
    :func:`~packing.context.layout.plan_layout` on :func:`batch_blocks` of the same batch).
    ``regather``: the attention's backward gathers the keys again rather than keeping them
    (:class:`ContextShard`)."""
    if not isinstance(regather, bool):
        raise TypeError(f"regather is {regather!r}; expected True or False")
    if batch.layout != "packed":
        raise ValueError(f"context parallelism cuts one packed row; got a {batch.layout!r} batch: use a packed collator "
                         "(concat) before the context-parallel step")
    for name in ("static_cu_seqlens", "attn_bias"):
        if getattr(batch, name) is not None:
            raise ValueError(f"context parallelism does not carry Batch.{name} to the shards yet; collate without it "
                             "(static shapes: pad the row to a fixed length instead)")
    if batch.context is not None:
        raise ValueError("the batch is already a context-parallel shard; shard the whole row once")
    if batch.input_ids.device.type != "cpu":
        raise ValueError(f"shard on the host (the layout and indices are host work), got a batch on "
                         f"{batch.input_ids.device}; shard first, then .to(device)")
    blocks = batch_blocks(batch)
    if tuple(blocks) != layout.block_lens:
        raise ValueError(f"the layout is for blocks {list(layout.block_lens)}, the batch has {blocks}; plan the layout "
                         "from this batch (plan_layout(batch_blocks(batch), world_size))")
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank is {rank!r}; the layout has ranks 0 to {layout.world_size - 1}")
    index = local_index(layout, rank)
    chunks = layout.chunks[rank]
    if not chunks:
        raise ValueError(f"rank {rank} holds no tokens of this row ({layout.num_slots} tokens over "
                         f"{layout.world_size} ranks); use fewer context-parallel ranks for rows this short")
    if any(b.split and not a.split for a, b in zip(chunks, chunks[1:])):
        raise ValueError(f"rank {rank}'s chunks put a whole block before a cut one; a layout lists each rank's cut "
                         "chunks first (their tokens are the ones all-gathered): use plan_layout")
    lengths = [c.length for c in chunks]
    context = ContextShard(layout, rank, batch.num_tokens, batch.num_targets, *_keys(layout, rank, layout.gather_len),
                           regather)
    take = lambda t: t[:, index]  # noqa: E731  (1, T) -> (1, local)
    return Batch(layout="packed", input_ids=take(batch.input_ids), labels=take(batch.labels),
                 position_ids=take(batch.position_ids), seq_lens=tuple(lengths),
                 cu_seqlens=cumulative_lengths(lengths), ignore_index=batch.ignore_index,
                 context=context)


def _keys(layout: ContextLayout, rank: int, gather_len: int):
    """(key_index, cu_seqlens_k, max_seqlen_k), each by causality, for rank ``rank``'s chunks."""
    world = layout.world_size
    source = torch.full((layout.num_slots,), -1, dtype=torch.int64)  # row position -> key source index
    for r in range(world):  # cut blocks: where rank r's all-gathered tokens land
        offset = r * gather_len
        for c in layout.chunks[r]:
            if c.split:
                source[c.start:c.end] = torch.arange(offset, offset + c.length)
                offset += c.length
    local = world * gather_len
    for c in layout.chunks[rank]:  # whole blocks: this rank's own tokens, after the gathered ones
        if not c.split:
            source[c.start:c.end] = torch.arange(local, local + c.length)
        local += c.length
    index, calls = {}, {}
    for causal in (True, False):
        spans = [(c.block_start, c.end if causal else c.block_end) for c in layout.chunks[rank]]
        index[causal] = torch.cat([source[a:b] for a, b in spans])
        calls[causal] = _kernel_calls(layout.chunks[rank], source, causal)
    return index, calls


def _kernel_calls(chunks, source: Tensor, causal: bool) -> KernelCalls:
    """:class:`KernelCalls` of one rank's ``chunks`` (cut ones first); ``source`` maps row positions
    to the key source, whose first tokens are the all-gathered ones."""
    whole = [c.length for c in chunks if not c.split]
    cut = [c for c in chunks if c.split]
    key_end = [c.end if causal else c.block_end for c in cut]
    local_start = [0]
    for c in cut:
        local_start.append(local_start[-1] + c.length)
    per_block: dict[int, list[int]] = {}  # block start -> its chunks (indices), by their keys' end
    for i, c in enumerate(cut):
        per_block.setdefault(c.block_start, []).append(i)
    for mine in per_block.values():  # the k-th chunk of each block (by where its keys end) goes to call k
        mine.sort(key=lambda i: (key_end[i], cut[i].start))
    keys, q_index, cu_q, cu_k, max_q, max_k = [], [], [], [], [], []
    for call in range(max((len(v) for v in per_block.values()), default=0)):
        mine = [per_block[b][call] for b in sorted(per_block) if call < len(per_block[b])]
        lq = [cut[i].length for i in mine]
        lk = [key_end[i] - cut[i].block_start for i in mine]
        keys.append(torch.cat([source[cut[i].block_start:key_end[i]] for i in mine]))
        q_index.append(torch.cat([torch.arange(local_start[i], local_start[i + 1]) for i in mine]))
        cu_q.append(cumulative_lengths(lq))
        cu_k.append(cumulative_lengths(lk))
        max_q.append(max(lq))
        max_k.append(max(lk))
    order = torch.empty(local_start[-1], dtype=torch.int64)
    rows = torch.cat(q_index) if q_index else order[:0]
    order[rows] = torch.arange(local_start[-1])
    return KernelCalls(cumulative_lengths(whole) if whole else None, max(whole, default=0), tuple(keys),
                       tuple(q_index), tuple(cu_q), tuple(cu_k), tuple(max_q), tuple(max_k), order,
                       torch.equal(rows, torch.arange(local_start[-1])))


def unshard(parts: list[Tensor], layout: ContextLayout) -> Tensor:
    """The whole row's tensor from each rank's part, in rank order: (1, local_r, ...) each ->
    (1, T, ...), bitwise the row the parts were cut from."""
    if len(parts) != layout.world_size:
        raise ValueError(f"unshard got {len(parts)} parts; the layout has {layout.world_size} ranks")
    for r, part in enumerate(parts):
        if part.dim() < 2 or part.shape[0] != 1 or part.shape[1] != layout.local_len(r):
            raise ValueError(f"part {r} has shape {tuple(part.shape)}; rank {r} holds (1, {layout.local_len(r)}, ...)")
    flat = torch.cat([p[0] for p in parts])
    out = flat.new_empty(flat.shape)
    out[torch.cat([local_index(layout, r) for r in range(layout.world_size)])] = flat
    return out[None]
