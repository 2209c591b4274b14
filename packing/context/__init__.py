"""Context parallelism: one long packed row split across ranks, exact per document and balanced.

:func:`plan_layout` decides which tokens each rank holds (long documents cut head-and-tail, short
ones whole, balanced by work); :func:`shard` gives a rank its part as a :class:`~packing.batch.Batch`
whose ``context`` carries what attention needs; :func:`unshard` puts the parts back together; and
:func:`context_attention` attends each local chunk to its whole document prefix, keys and values
all-gathered across the context-parallel group.
"""

from packing.context.attention import context_attention
from packing.context.collate import ContextCollator
from packing.context.layout import Chunk, ContextLayout, plan_layout
from packing.context.shard import ContextShard, batch_blocks, shard, unshard

__all__ = ["Chunk", "ContextCollator", "ContextLayout", "ContextShard", "batch_blocks", "context_attention", "plan_layout", "shard",
           "unshard"]
