"""Run by tests/packing/test_context.py under torchrun (gloo): the context all-gather of unequal
and equal parts, forward and backward, against values every rank can work out, on gloo's branch
and on the NCCL branch's collectives where gloo has them (the backend name patched). Exits 1 with
the mismatch on a wrong value.
Usage: all_gather_worker.py"""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from packing.context import attention
from packing.context.attention import _AllGather


def part(r: int, n: int) -> torch.Tensor:
    """Rank r's x: n numbers no other rank sends."""
    return torch.arange(n, dtype=torch.float64) + 1000 * r


def grad(q: int, total: int) -> torch.Tensor:
    """Rank q's gradient of the gathered tokens."""
    return torch.arange(total, dtype=torch.float64) * (q + 1) + q


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got, want):
        raise SystemExit(f"{name}: rank {dist.get_rank()} got {got.tolist()}, want {want.tolist()}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for sizes in ((3,) * world, tuple(range(world)), tuple(5 if r % 2 else 0 for r in range(world))):
        total, start = sum(sizes), sum(sizes[:rank])
        # Every rank's gradient of this rank's part, summed: what the backward must return.
        want_grad = sum(grad(q, total) for q in range(world))[start:start + sizes[rank]]
        want_out = torch.cat([part(r, n) for r, n in enumerate(sizes)])
        x = part(rank, sizes[rank]).requires_grad_()
        out = _AllGather.apply(x, sizes, None)
        check(f"gloo forward {sizes}", out.detach(), want_out)
        out.backward(grad(rank, total))
        check(f"gloo backward {sizes}", x.grad, want_grad)
        # The NCCL branch's collectives, where gloo has them: the even forward and backward
        # (one-buffer all-gather and reduce-scatter), and the uneven backward (the list
        # reduce-scatter; gloo has no uneven all_gather for the uneven forward).
        real = attention.dist.get_backend
        attention.dist.get_backend = lambda group=None: "nccl"
        try:
            if len(set(sizes)) == 1:
                x = part(rank, sizes[rank]).requires_grad_()
                out = _AllGather.apply(x, sizes, None)
                check(f"nccl branch forward {sizes}", out.detach(), want_out)
                out.backward(grad(rank, total))
                check(f"nccl branch backward {sizes}", x.grad, want_grad)
            else:
                ctx = SimpleNamespace(sizes=sizes, group=None, nccl=True, even=False)
                got, *_ = _AllGather.backward(ctx, grad(rank, total))
                check(f"nccl branch backward {sizes}", got, want_grad)
        finally:
            attention.dist.get_backend = real
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
