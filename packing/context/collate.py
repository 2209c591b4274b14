"""The context-parallel collate step: any packed collator, then this rank's shard of its row."""

from __future__ import annotations

from typing import Any, Sequence

from packing.batch import Batch
from packing.collate import Collator
from packing.context.layout import ALIGN, AREA_COST, plan_layout
from packing.context.shard import batch_blocks, shard


class ContextCollator:
    """``collator(samples)``, one packed row, cut for rank ``rank`` of ``world_size``
    context-parallel ranks: a :class:`~packing.batch.Batch` whose ``context`` says how.

    Every rank of the group collates the same samples (the same data-parallel slice) and keeps its
    part; the layout is a pure function of the row and ``world_size``, so the ranks agree without
    talking, and a resumed sampler or stream gives the same shards again. ``split_fraction``,
    ``split_tokens``, ``area_cost``, ``spread`` and ``align`` go to :func:`~packing.context.layout.plan_layout`, and
    ``regather`` to :func:`~packing.context.shard.shard`.

    Examples:
        >>> from packing import get_collator
        >>> collate = ContextCollator(get_collator("concat"), world_size=2, rank=1, split_tokens=4)
        >>> part = collate([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]])
        >>> part.input_ids.tolist(), part.context.num_targets
        ([[3, 4, 5, 6]], 8)
    """

    def __init__(self, collator: Collator, *, world_size: int, rank: int, split_fraction: float = 0.5,
                 split_tokens: int | None = None, area_cost: float = AREA_COST, spread: str = "all",
                 align: int = ALIGN, regather: bool = False) -> None:
        if not callable(collator):
            raise TypeError(f"collator must be a packed collator (get_collator('concat', ...)), got {type(collator).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < (world_size if isinstance(world_size, int) else 0):
            raise ValueError(f"rank is {rank!r}; expected an int in [0, world_size={world_size!r})")
        plan_layout([1], world_size, split_fraction=split_fraction, split_tokens=split_tokens,
                    area_cost=area_cost, spread=spread, align=align)  # checks the options
        self.collator, self.world_size, self.rank = collator, world_size, rank
        if not isinstance(regather, bool):
            raise TypeError(f"regather is {regather!r}; expected True or False")
        self.split_fraction, self.split_tokens, self.area_cost, self.spread = split_fraction, split_tokens, area_cost, spread
        self.align, self.regather = align, regather

    def __call__(self, samples: Sequence[Any]) -> Batch:
        batch = self.collator(samples)
        layout = plan_layout(batch_blocks(batch) if batch.layout == "packed" else [1], self.world_size,
                             split_fraction=self.split_fraction, split_tokens=self.split_tokens,
                             area_cost=self.area_cost, spread=self.spread, align=self.align)
        return shard(batch, layout, self.rank, regather=self.regather)

    def __repr__(self) -> str:
        return (f"ContextCollator({self.collator!r}, world_size={self.world_size}, rank={self.rank}, "
                f"split_fraction={self.split_fraction}, split_tokens={self.split_tokens}, area_cost={self.area_cost}, "
                f"spread={self.spread!r}, align={self.align}, regather={self.regather})")
