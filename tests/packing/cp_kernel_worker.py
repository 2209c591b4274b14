"""Run by tests/packing/test_context.py under torchrun (gloo): context_attention with a varlen
kernel (the one written out in test_context_exact, bottom-right causal) in fp64 on every rank of one
mixed row, forward and backward through the real all-gather and its reduce-scatter. Each rank saves
its output and the q, k and v gradients of its own rows.
Usage: cp_kernel_worker.py OUT_PREFIX CAUSAL(0|1) REGATHER(0|1) SPREAD(all|fewest)"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_context_exact import ROWS, SPREADS, bottom_right, row_of  # noqa: E402

from packing.context import batch_blocks, context_attention, plan_layout, shard  # noqa: E402
from packing.context.shard import local_index  # noqa: E402


def main(out: str, causal: bool, regather: bool, spread: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch, q, k, v = row_of(ROWS["mixed"])
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layout = plan_layout(batch_blocks(batch), world, **SPREADS[spread])
    part = shard(batch, layout, rank, regather=regather)
    idx = local_index(layout, rank)
    leaves = [t[idx].clone().requires_grad_() for t in (q, k, v)]
    got = context_attention(*leaves, part, causal=causal, kernel=bottom_right)
    got.backward(d_out[idx])
    torch.save({"out": got.detach(), "grads": [t.grad for t in leaves]}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4])
