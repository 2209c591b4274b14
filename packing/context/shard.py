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
block when bidirectional), as one varlen kernel call's boundaries and as indices for the masked
path.

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
from functools import cached_property

import torch
from torch import Tensor

from packing.batch import Batch
from packing.boundaries import block_lengths, cumulative_lengths, packed_positions
from packing.context.layout import ContextLayout


@dataclass(frozen=True, eq=False)
class KernelCall:
    """How one varlen kernel call runs all of a shard's chunks (one causality).

    Sequence i of the call is local chunk i: its queries are the chunk's rows of the local row, so
    q goes in as it is, and the output comes out in local order. Its keys are its block's prefix up
    to the chunk's end (bidirectional: the whole block). The call's keys are the cut chunks' keys,
    copied from the all-gathered tokens, then the whole blocks' keys, the local rows after the cut
    ones. A key that two chunks read (a block cut head-and-tail gives a rank two chunks, and the
    head's keys are a prefix of the tail's) is copied for each, so the kernel reads no key twice in
    one sequence and no key a sequence does not read; the backward adds the copies' gradients.

    The gathered tokens are handled as pieces: each rank's cut-block tokens cut into one piece a
    cut chunk it holds, in its local order. Pieces are numbered rank-major.

    Fields (C local chunks; P pieces; R reads of a piece by a chunk, in key order):
        cu_q, cu_k: (C + 1,) int32 cumulative query and key lengths of the C sequences.
        max_q, max_k: the longest sequence's queries and keys (host ints).
        pieces: per rank, the lengths of its pieces (summing to ``layout.split_len(rank)``; () for
            a rank that holds no cut chunk); () when nothing is cut.
        reads: (R,) the pieces, by number, whose tokens concatenated in this order are the cut
            chunks' keys (the first ``cu_k[number of cut chunks]`` keys of the call).
        sums: for each stretch of keys read more than once, ``(starts, lengths)``: the key offsets
            where each of its reads begins, and the lengths of its pieces. Consecutive pieces read
            together are one stretch (a block's chunks 0 to r, in both its head's and its tail's
            keys), so the backward adds them in one add per read.
        grads: per piece, where its gradient comes from: ``(0, 0)`` unread (zeros); ``(1, i)``
            its one read, read i; ``(2 + s, j)`` piece j of stretch s's sum.

    Example: one 16-token document and a 2-token one on 2 ranks. Rank 0 holds the chunks [0, 4)
    and [12, 16) of the first: pieces 0 and 1 of the gathered tokens; rank 1 holds [4, 8) and
    [8, 12), pieces 2 and 3. Rank 0's head chunk reads piece 0, its tail the whole document,
    pieces 0, 2, 3, 1: ``reads`` is (0, 0, 2, 3, 1), ``cu_k`` [0, 4, 20], and piece 0's gradient
    is the sum of the keys at offsets 0 and 4 (``sums`` (((0, 4), (4,)),)).
    """

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    pieces: tuple[tuple[int, ...], ...]
    reads: tuple[int, ...]
    sums: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    grads: tuple[tuple[int, int], ...]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """The pieces' lengths, in piece order."""
        return tuple(n for rank in self.pieces for n in rank)

    @cached_property
    def cut_keys(self) -> int:
        """Keys of the call copied from the gathered tokens (the cut chunks')."""
        return sum(self.sizes[p] for p in self.reads)

    def map(self, fn) -> KernelCall:
        return KernelCall(fn(self.cu_q), fn(self.cu_k), self.max_q, self.max_k, self.pieces, self.reads, self.sums,
                          self.grads)


@dataclass(frozen=True, eq=False)
class ContextShard:
    """What rank ``rank`` needs beyond its tokens to attend exactly (``Batch.context``).

    Fields (C local chunks; K the keys of all of them together; G = ``layout.gather_tokens``, the
    all-gather's tokens, rank by rank; the first ``layout.split_len(rank)`` local tokens are this
    rank's contribution):
        layout: the row's :class:`ContextLayout` (world size, blocks, every rank's chunks, version).
        rank: this shard's rank.
        num_tokens: the whole row's real tokens (its documents; the rest is the padding tail).
        num_targets: the whole row's targets: the loss denominator every rank uses.
        key_index: per causality, (K,) int64 indices into the (G + local tokens) key source, each
            chunk's keys in order: causal, its block from the start to the chunk's end;
            bidirectional, its whole block (the masked path's keys).
        kernel_call: per causality, :class:`KernelCall`: one varlen kernel call over all the
            chunks, each cut chunk's keys copied from the gathered tokens.
        regather: whether the attention's backward all-gathers the keys and values again instead
            of keeping them from the forward (its forward is recomputed): the memory of the gathered
            keys, every layer, against one more forward of the attention.
    """

    layout: ContextLayout
    rank: int
    num_tokens: int
    num_targets: int
    key_index: dict[bool, Tensor]
    kernel_call: dict[bool, KernelCall]
    regather: bool = False

    def map(self, fn) -> ContextShard:
        """The same shard with ``fn`` applied to its tensors (``Batch.to``, ``pin_memory``)."""
        return ContextShard(self.layout, self.rank, self.num_tokens, self.num_targets,
                            {c: fn(t) for c, t in self.key_index.items()},
                            {c: call.map(fn) for c, call in self.kernel_call.items()}, self.regather)

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
    context = ContextShard(layout, rank, batch.num_tokens, batch.num_targets, *_keys(layout, rank),
                           regather)
    take = lambda t: t[:, index]  # noqa: E731  (1, T) -> (1, local)
    return Batch(layout="packed", input_ids=take(batch.input_ids), labels=take(batch.labels),
                 position_ids=take(batch.position_ids), seq_lens=tuple(lengths),
                 cu_seqlens=cumulative_lengths(lengths), ignore_index=batch.ignore_index,
                 context=context)


def _keys(layout: ContextLayout, rank: int):
    """(key_index, kernel_call), each by causality, for rank ``rank``'s chunks."""
    world = layout.world_size
    source = torch.full((layout.num_slots,), -1, dtype=torch.int64)  # row position -> key source index
    for r in range(world):  # cut blocks: where rank r's all-gathered tokens land
        offset = layout.gather_offsets[r]
        for c in layout.chunks[r]:
            if c.split:
                source[c.start:c.end] = torch.arange(offset, offset + c.length)
                offset += c.length
    local = layout.gather_tokens
    for c in layout.chunks[rank]:  # whole blocks: this rank's own tokens, after the gathered ones
        if not c.split:
            source[c.start:c.end] = torch.arange(local, local + c.length)
        local += c.length
    index, call = {}, {}
    pieces = _gathered_pieces(layout)
    for causal in (True, False):
        spans = [(c.block_start, c.end if causal else c.block_end) for c in layout.chunks[rank]]
        index[causal] = torch.cat([source[a:b] for a, b in spans])
        call[causal] = _kernel_call(layout.chunks[rank], *pieces, causal)
    return index, call


def _gathered_pieces(layout: ContextLayout) -> tuple[list[tuple[int, ...]], dict[int, list[tuple[int, int, int]]]]:
    """(per rank its pieces' lengths, block -> [(start, end, piece)] of its cut chunks in row order) of the
    gathered tokens (:class:`KernelCall`); both empty when nothing is cut."""
    pieces, by_block, number = [], {}, 0
    for r in range(layout.world_size):
        lengths = []
        for c in layout.chunks[r]:
            if c.split:
                by_block.setdefault(c.block, []).append((c.start, c.end, number))
                lengths.append(c.length)
                number += 1
        pieces.append(tuple(lengths))
    for mine in by_block.values():
        mine.sort()  # row order: a chunk's keys are its block's chunks up to its own end
    return (pieces, by_block) if by_block else ([], {})


def _kernel_call(chunks, pieces: list[tuple[int, ...]], by_block: dict[int, list[tuple[int, int, int]]],
                 causal: bool) -> KernelCall:
    """:class:`KernelCall` of one rank's ``chunks`` (cut ones first), on the gathered tokens'
    ``pieces`` and ``by_block`` of :func:`_gathered_pieces`."""
    sizes = [n for rank_pieces in pieces for n in rank_pieces]
    reads, key_lens = [], []
    for c in chunks:
        key_end = c.end if causal else c.block_end
        if c.split:  # its block's chunks up to key_end, in row order, all on the gathered tokens
            mine = [p for start, end, p in by_block[c.block] if end <= key_end]
            reads += mine
            key_lens.append(sum(sizes[p] for p in mine))
        else:  # a whole block: its own tokens, causal or not
            key_lens.append(c.length)
    sums, grads = _sums(reads, sizes)
    lengths = [c.length for c in chunks]
    return KernelCall(cumulative_lengths(lengths), cumulative_lengths(key_lens), max(lengths), max(key_lens),
                      tuple(pieces), tuple(reads), sums, grads)


def _sums(reads: list[int], sizes: list[int]):
    """(sums, grads) of :class:`KernelCall` for the pieces ``reads`` (in key order) of lengths ``sizes``."""
    starts = [0]
    for p in reads:
        starts.append(starts[-1] + sizes[p])
    where: dict[int, list[int]] = {}  # piece -> the reads of it (indices into reads)
    for i, p in enumerate(reads):
        where.setdefault(p, []).append(i)
    sums, grads = [], [(0, 0)] * len(sizes)
    for p, mine in where.items():
        if len(mine) == 1:
            grads[p] = (1, mine[0])
    for i, p in enumerate(reads):
        if len(where[p]) < 2 or grads[p] != (0, 0) or where[p][0] != i:
            continue
        # A stretch: p, then the piece after each of p's reads, as long as that is one piece read
        # exactly there (a block's chunks read in the same order by each of its chunks).
        members, at = [p], where[p]
        while at[-1] + 1 < len(reads):
            q = reads[at[0] + 1]
            if where[q] != [j + 1 for j in at] or q in members:
                break
            members.append(q)
            at = where[q]
        for j, q in enumerate(members):
            grads[q] = (2 + len(sums), j)
        sums.append((tuple(starts[j] for j in where[p]), tuple(sizes[q] for q in members)))
    return tuple(sums), tuple(grads)


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
