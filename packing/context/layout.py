"""Which tokens of one packed row each context-parallel rank holds: a pure function of the row's
blocks and the number of ranks.

A causal document's attention work grows with the square of its length, so cutting a row into N
contiguous pieces leaves the last rank the most work (max/mean 1.5, 1.75 and 1.875 for one document
on N = 2, 4 and 8). Here:

- a **long** block (a document, or the padding tail) is cut into 2N chunks of near-equal length,
  and rank r takes chunks r and 2N-1-r (head and tail), which equalises their causal area;
- a **short** block stays whole on one rank, so it needs neither cutting nor its keys gathered;
  short blocks go, longest first, to the rank with the least work so far.

Work is counted as ``tokens + area_cost * causal_area``: the per-token layers against attention
(:data:`AREA_COST`, a width-1024 model's ratio, by default). A block is long when its work is more
than ``split_fraction`` of one rank's share, or when it has at least ``split_tokens`` tokens.

Examples:
    One 16-token document on 2 ranks: chunks of 4 tokens, rank 0 the first and the last.

    >>> layout = plan_layout([16], world_size=2)
    >>> [[(c.start, c.end) for c in rank] for rank in layout.chunks]
    [[(0, 4), (12, 16)], [(4, 8), (8, 12)]]
    >>> [sum(c.area() for c in rank) for rank in layout.chunks]  # (query, key) pairs each
    [68, 68]

    Short documents stay whole, and the row's tokens are each held once:

    >>> layout = plan_layout([3, 9, 2, 2], world_size=2, split_tokens=8)
    >>> [[(c.block, c.start, c.end) for c in rank] for rank in layout.chunks]
    [[(1, 3, 5), (1, 9, 12), (2, 12, 14)], [(1, 5, 7), (1, 7, 9), (0, 0, 3), (3, 14, 16)]]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
import math

from typing import Sequence

# Relative work of a token in the per-token layers and of one (query, key) pair in attention, for
# the balance only; what matters is their ratio. A transformer layer of width d does about 12·d²
# multiply-adds a token in its linear layers and 2·d a visible (query, key) pair in attention, so
# a pair costs 1/(6·d) of a token: 1/6144 at d = 1024. Pass area_cost=1 / (6 * d) for another width.
TOKEN_COST = 1.0
AREA_COST = 1.0 / 6144

VERSION = 2  # 2: a rank's cut chunks are its head chunks, then its tail chunks

# Where a cut block goes (plan_layout's spread): over every rank, or over the fewest its work needs.
SPREADS = ("all", "fewest")
# Where cut chunks start by default (plan_layout's align): FlashAttention's query tile. Timed on one
# H100, aligned cuts made the slowest rank faster with torch's kernel and no slower with
# FlashAttention-4 (benchmarks/results/distributed/2026-12-07-h100-context-align/).
ALIGN = 128


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, end)`` of the row, inside block ``block``, which spans ``[block_start,
    block_end)``. ``split`` says whether the block is cut across ranks (its keys are gathered)."""

    block: int
    start: int
    end: int
    block_start: int
    block_end: int
    split: bool

    @property
    def length(self) -> int:
        return self.end - self.start

    def area(self, causal: bool = True) -> int:
        """(query, key) pairs this chunk's queries see: causal, each query its block's prefix up to
        itself; bidirectional, the whole block."""
        if not causal:
            return self.length * (self.block_end - self.block_start)
        first, last = self.start - self.block_start + 1, self.end - self.block_start
        return (first + last) * self.length // 2


@dataclass(frozen=True)
class ContextLayout:
    """The ranks' chunks of one row: ``chunks[r]`` in the order rank r holds them (the cut blocks'
    head chunks, then their tail chunks, then the whole blocks, each group in row order). ``block_lens`` are the row's blocks (the documents, then the padding
    tail, if any), so ``sum(block_lens)`` is the row's length."""

    world_size: int
    block_lens: tuple[int, ...]
    chunks: tuple[tuple[Chunk, ...], ...]
    area_cost: float = AREA_COST
    version: int = VERSION

    @property
    def num_slots(self) -> int:
        return sum(self.block_lens)

    def local_len(self, rank: int) -> int:
        return sum(c.length for c in self.chunks[rank])

    def split_len(self, rank: int) -> int:
        """Tokens of rank ``rank`` in cut blocks: the prefix of its local row that it all-gathers."""
        return sum(c.length for c in self.chunks[rank] if c.split)

    @cached_property
    def gather_offsets(self) -> tuple[int, ...]:
        """(world_size + 1,) where each rank's cut-block tokens sit in the all-gathered ones: rank
        r's are tokens ``[gather_offsets[r], gather_offsets[r + 1])``. The all-gather moves these
        and nothing else: a rank with fewer cut tokens sends fewer, none padded."""
        return tuple(accumulate((self.split_len(r) for r in range(self.world_size)), initial=0))

    @property
    def gather_tokens(self) -> int:
        """The all-gathered tokens: every rank's cut-block tokens (0 when no block is cut)."""
        return self.gather_offsets[-1]

    def work(self, causal: bool = True) -> list[float]:
        """Each rank's work, ``tokens + area_cost * area``."""
        return [sum(_work(c.length, c.area(causal), self.area_cost) for c in rank) for rank in self.chunks]


def _work(tokens: int, area: int, area_cost: float) -> float:
    return TOKEN_COST * tokens + area_cost * area


def plan_layout(block_lens: Sequence[int], world_size: int, *, split_fraction: float = 0.5,
                split_tokens: int | None = None, area_cost: float = AREA_COST, spread: str = "all",
                align: int = ALIGN) -> ContextLayout:
    """The layout of a row of blocks ``block_lens`` (each >= 1 token) over ``world_size`` ranks.

    A block is cut when it has at least ``2 * world_size`` tokens and either its causal work
    exceeds ``split_fraction`` of one rank's share of the row's, or it has at least
    ``split_tokens`` tokens. ``area_cost``: a (query, key) pair's work relative to a token's (about
    1/(6·d) for a model of width d). ``spread``, where a cut block goes:

    - ``"all"``: over every rank, in ``2 * world_size`` chunks;
    - ``"fewest"``: over the fewest ranks m that keep each one's part within ``split_fraction`` of
      a share (and under ``split_tokens`` tokens), in 2m chunks head-and-tail on the m ranks with
      the least work so far. Each chunk is longer, so a varlen kernel's backward runs fewer,
      longer passes over the keys it reads; the ranks then hold unequal cut tokens, and the
      all-gather moves each rank's own count (:attr:`ContextLayout.gather_offsets`).

    ``align``: a cut block's chunks start at multiples of ``align`` tokens from the block's start
    (its last chunk ends with the block), when the block has at least ``align`` tokens a chunk.
    A varlen kernel tiles each sequence's queries and keys from the sequence's start, in tiles of
    128 for FlashAttention; a chunk that starts on a tile edge fills its query tiles and meets the
    causal diagonal on a tile edge, as the unsharded document does. The default is 128
    (:data:`ALIGN`); 1 cuts at the nearest token.

    The result depends on nothing but the arguments.

    Examples:
        A 32-token document and six of 16 on 4 ranks, work counted as attention area plus tokens;
        ``"fewest"`` cuts the long one over two ranks in 4 chunks of 8, not over four in 8 of 4:

        >>> layout = plan_layout([32, 16, 16, 16, 16, 16, 16], 4, split_fraction=1, area_cost=1, spread="fewest")
        >>> [[(c.block, c.start, c.end) for c in rank] for rank in layout.chunks]
        [[(0, 0, 8), (0, 24, 32), (5, 96, 112)], [(0, 8, 16), (0, 16, 24), (6, 112, 128)], [(1, 32, 48), (3, 64, 80)], [(2, 48, 64), (4, 80, 96)]]
        >>> layout.gather_offsets  # ranks 0 and 1 all-gather 16 tokens each, ranks 2 and 3 none
        (0, 16, 32, 32, 32)

        One 1,000-token document on 2 ranks, cut at multiples of 128 tokens (the default), and
        at any token:

        >>> [[(c.start, c.end) for c in rank] for rank in plan_layout([1000], 2).chunks]
        [[(0, 256), (768, 1000)], [(256, 512), (512, 768)]]
        >>> [[(c.start, c.end) for c in rank] for rank in plan_layout([1000], 2, align=1).chunks]
        [[(0, 250), (750, 1000)], [(250, 500), (500, 750)]]
    """
    lens = tuple(int(n) for n in block_lens)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size is {world_size!r}; expected an int >= 1 (the context-parallel ranks)")
    if not lens or min(lens) < 1:
        raise ValueError(f"block_lens is {list(lens)}; expected one or more blocks of >= 1 token")
    if not 0 < split_fraction:
        raise ValueError(f"split_fraction is {split_fraction!r}; expected > 0 (of one rank's share of the work)")
    if isinstance(area_cost, bool) or not isinstance(area_cost, (int, float)) or not 0 <= area_cost < math.inf:
        raise ValueError(f"area_cost is {area_cost!r}; expected a finite number >= 0 (a (query, key) pair's work relative to a token's, about 1/(6·d) for a model of width d)")
    if split_tokens is not None and split_tokens < 1:
        raise ValueError(f"split_tokens is {split_tokens!r}; expected None or an int >= 1")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align is {align!r}; expected an int >= 1 (the tokens a cut chunk's start is a multiple "
                         "of, from its block's start: 128 for FlashAttention's tiles, 1 for none)")
    if spread not in SPREADS:
        raise ValueError(f"spread is {spread!r}; expected 'all' (a cut block over every rank) or 'fewest' (over the "
                         "fewest ranks its work needs)")
    parts = 2 * world_size
    starts = [sum(lens[:i]) for i in range(len(lens))]
    whole_work = [_work(n, n * (n + 1) // 2, area_cost) for n in lens]
    share = sum(whole_work) / world_size
    cut = [world_size > 1 and n >= parts and (w > split_fraction * share or (split_tokens is not None and n >= split_tokens))
           for n, w in zip(lens, whole_work)]

    if spread == "fewest":
        return _fewest(lens, starts, world_size, whole_work, share, cut, split_fraction, split_tokens, area_cost, align)
    ranks: list[list[Chunk]] = [[] for _ in range(world_size)]
    # Each rank's head chunks (chunk r of every cut block, in row order), then its tail chunks: a
    # varlen kernel runs each group in one call on a slice of the local row (KernelCalls).
    for head in (True, False):
        for b, (n, start) in enumerate(zip(lens, starts)):
            if not cut[b]:
                continue
            edges = _edges(start, n, parts, align)
            for r in range(world_size):
                i = r if head else parts - 1 - r
                ranks[r].append(Chunk(b, edges[i], edges[i + 1], start, start + n, True))
    load = [sum(_work(c.length, c.area(), area_cost) for c in rank) for rank in ranks]
    # Whole blocks, the most work first, each to the rank with the least so far (the lowest rank on
    # a tie): deterministic, and within 1 block's work of the best balance.
    for b in sorted((b for b in range(len(lens)) if not cut[b]), key=lambda b: (-whole_work[b], b)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        ranks[r].append(Chunk(b, starts[b], starts[b] + lens[b], starts[b], starts[b] + lens[b], False))
        load[r] += whole_work[b]
    for r in range(world_size):  # whole blocks in row order after the cut ones, for a readable row
        whole = sorted((c for c in ranks[r] if not c.split), key=lambda c: c.start)
        ranks[r] = [c for c in ranks[r] if c.split] + whole
    return ContextLayout(world_size, lens, tuple(tuple(rank) for rank in ranks), area_cost)


def _edges(start: int, n: int, parts: int, align: int) -> list[int]:
    """The ``parts + 1`` edges of an ``n``-token block at ``start`` cut in ``parts`` near-equal
    chunks: inner edge i at ``i * n / parts``, rounded down to a token, or with ``align`` > 1 to the
    nearest multiple of ``align`` from the block's start when the chunks have ``align`` tokens or
    more (edges ``align`` apart or more still rise after rounding, and the last stays below n)."""
    if align == 1 or n < parts * align:
        return [start + i * n // parts for i in range(parts + 1)]
    return [start + (n if i == parts else align * ((2 * i * n + parts * align) // (2 * parts * align)))
            for i in range(parts + 1)]


def _fewest(lens, starts, world_size, whole_work, share, cut, split_fraction, split_tokens, area_cost, align) -> ContextLayout:
    """:func:`plan_layout` with ``spread="fewest"``: every block, cut or whole, placed by its part of
    a rank's work, the largest first (a cut block's m parts on the m ranks with the least work so
    far, the lowest rank on a tie): deterministic."""
    spans = []
    for b, n in enumerate(lens):
        m = 1
        if cut[b]:
            m = math.ceil(whole_work[b] / (split_fraction * share))
            if split_tokens is not None and n >= split_tokens:
                m = max(m, n // split_tokens + 1)  # each part under split_tokens tokens
            m = max(2, min(world_size, n // 2, m))
        spans.append(m)
    ranks: list[list[tuple[int, Chunk]]] = [[] for _ in range(world_size)]  # (0 head, 1 tail, 2 whole; chunk)
    load = [0.0] * world_size
    for b in sorted(range(len(lens)), key=lambda b: (-whole_work[b] / spans[b], b)):
        n, start, m = lens[b], starts[b], spans[b]
        mine = sorted(sorted(range(world_size), key=lambda r: (load[r], r))[:m])
        if not cut[b]:
            ranks[mine[0]].append((2, Chunk(b, start, start + n, start, start + n, False)))
            load[mine[0]] += whole_work[b]
            continue
        edges = _edges(start, n, 2 * m, align)
        for i, r in enumerate(mine):  # the i-th of the m ranks: chunks i and 2m-1-i (head and tail)
            for kind, j in ((0, i), (1, 2 * m - 1 - i)):
                chunk = Chunk(b, edges[j], edges[j + 1], start, start + n, True)
                ranks[r].append((kind, chunk))
                load[r] += _work(chunk.length, chunk.area(), area_cost)
    # Each rank's head chunks, then its tail chunks, then its whole blocks, each in row order.
    chunks = tuple(tuple(c for _, c in sorted(rank, key=lambda t: (t[0], t[1].start))) for rank in ranks)
    return ContextLayout(world_size, lens, chunks, area_cost)
