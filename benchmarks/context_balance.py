"""How evenly a context-parallel layout spreads one packed row's work, by the layout's cost model.

    python -m benchmarks.context_balance                  # the two rows below, N = 2, 4, 8
    python -m benchmarks.context_balance --json out.json

Two rows of 131,072 tokens: one document, and documents with log-normal lengths (mu 7.5, sigma
1.4, seed 0) filling the row. For each N it prints each rank's work (a token 1, a visible (query,
key) pair 1/(6·d) for ``--dim`` d; :mod:`packing.context.layout`) as max/mean, for a
contiguous split of the row into N equal pieces and for :func:`~packing.context.plan_layout`, with
how many documents the layout cut, the tokens whose keys it all-gathers, and the all-gather's
padding (ranks whose cut-document tokens fall short of the largest pad to it) over the row's tokens. The same max/mean over
attention alone (the causal area) shows the cost a contiguous split puts on the last rank. These are
the cost model's numbers, not kernel times: the GPU's per-rank kernel times are the measurement
that counts (a multi-GPU run).

    python -m benchmarks.context_balance --spread all fewest --align 1 128 --tile 128

The tile count is the work a FlashAttention-style kernel does, in (tile x tile) blocks of
(query, key) pairs: each chunk's queries in tiles from the chunk's start, each query tile reading
its document's keys in tiles from the document's start up to its last query (a causal kernel
skips the key tiles past the diagonal, not the part of a tile past it). A row's tiles against the
rank's share ("tiles: slowest x N / whole") is what cutting costs beyond the causal area: the
ragged query tiles of chunks whose length is not a multiple of the tile, and the diagonal tiles a
chunk meets off a tile edge; ``--align`` puts the cuts on tile edges. Still a model: the
kernel's per-call and per-sequence costs are not in it.
"""

from __future__ import annotations

import json
import statistics
import sys


from benchmarks.cp import lognormal_row
from benchmarks.harness import Parser
from packing.context.layout import ALIGN, SPREADS, TOKEN_COST, ContextLayout, plan_layout

ROW = 131_072


def contiguous(lens: list[int], world: int, area_only: bool, area_cost: float) -> list[float]:
    """Each rank's work when the row is cut into ``world`` equal contiguous pieces."""
    edges = [r * sum(lens) // world for r in range(world + 1)]
    work = [0.0] * world
    start = 0
    for n in lens:
        for r in range(world):
            a, b = max(start, edges[r]), min(start + n, edges[r + 1])
            if a < b:
                first, last = a - start + 1, b - start
                area = (first + last) * (b - a) / 2
                work[r] += area if area_only else TOKEN_COST * (b - a) + area_cost * area
        start += n
    return work


def tiles(layout: ContextLayout, rank: int, tile: int) -> int:
    """The (tile x tile) blocks of causal attention rank ``rank``'s chunks cost a tiled kernel:
    query tiles from each chunk's start, key tiles from its document's start up to the query
    tile's last position."""
    count = 0
    for c in layout.chunks[rank]:
        offset = c.start - c.block_start  # the chunk's first query, from its document's start
        for first in range(0, c.length, tile):
            count += -(-(offset + min(first + tile, c.length)) // tile)
    return count


def whole_tiles(lens: list[int], tile: int) -> int:
    """:func:`tiles` of the unsharded row: each document one sequence (the layout of one rank)."""
    return tiles(plan_layout(lens, 1), 0, tile)


def ratio(work: list[float]) -> float:
    return max(work) / statistics.mean(work)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.context_balance", description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--dim", type=int, default=1024, help="model width d: a (query, key) pair costs 1/(6 d) of a token "
                                                         "(default 1024)")
    p.add_argument("--spread", nargs="+", choices=SPREADS, default=["all"],
                   help="where a cut document goes, one layout each: over every rank (all) or the fewest (default all)")
    p.add_argument("--align", nargs="+", type=int, default=[ALIGN], metavar="A",
                   help="cut chunks start at multiples of A tokens from their document's start, one layout each "
                        f"(default {ALIGN}; 1: anywhere)")
    p.add_argument("--tile", type=int, default=128, help="the kernel's tile, in tokens, for the tile count (default 128)")
    args = p.parse_args(argv)
    if args.dim < 1:
        p.error(f"--dim is {args.dim}; expected a model width >= 1")
    for name, values in (("--align", args.align), ("--tile", [args.tile])):
        for value in values:
            if value < 1:
                p.error(f"{name} {value} is out of range; expected an int >= 1 (tokens)")
    area_cost = 1 / (6 * args.dim)
    rows = {"one 131,072-token document": [ROW], "log-normal mix (mu 7.5, sigma 1.4)": lognormal_row(ROW)}
    records = []
    print(f"{'row':<36} {'N':>2} {'layout':<18} {'contiguous attn':>16} {'contiguous work':>16} {'layout attn':>12} "
          f"{'layout work':>12} {'cut docs':>9} {'gathered tokens':>16} {'tiles x N / whole':>18}")
    for name, lens in rows.items():
        whole = whole_tiles(lens, args.tile)
        for world in (2, 4, 8):
            contiguous_attention = ratio(contiguous(lens, world, True, area_cost))
            contiguous_work = ratio(contiguous(lens, world, False, area_cost))
            for spread in args.spread:
                for align in args.align:
                    layout = plan_layout(lens, world, area_cost=area_cost, spread=spread, align=align)
                    area = [sum(c.area() for c in rank) for rank in layout.chunks]
                    cut = {c.block for rank in layout.chunks for c in rank if c.split}
                    rank_tiles = [tiles(layout, r, args.tile) for r in range(world)]
                    record = {"row": name, "tokens": sum(lens), "docs": len(lens), "longest": max(lens),
                              "world_size": world, "spread": spread, "align": align,
                              "contiguous_attention_max_over_mean": contiguous_attention,
                              "contiguous_work_max_over_mean": contiguous_work,
                              "layout_attention_max_over_mean": ratio(area),
                              "layout_work_max_over_mean": ratio(layout.work()),
                              "cut_documents": len(cut), "gathered_tokens": layout.gather_tokens, "tile": args.tile,
                              "tiles_slowest_x_n_over_whole": max(rank_tiles) * world / whole,
                              "tiles_sum_over_whole": sum(rank_tiles) / whole,
                              "dim": args.dim, "command": p.command(argv)}
                    records.append(record)
                    print(f"{name:<36} {world:>2} {spread + ', align ' + str(align):<18} "
                          f"{record['contiguous_attention_max_over_mean']:>16.3f} "
                          f"{record['contiguous_work_max_over_mean']:>16.3f} "
                          f"{record['layout_attention_max_over_mean']:>12.3f} "
                          f"{record['layout_work_max_over_mean']:>12.3f} {len(cut):>9} "
                          f"{record['gathered_tokens']:>16,} {record['tiles_slowest_x_n_over_whole']:>18.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
