"""Our context-parallel attention against torch's own, on the same row and ranks: torch's
``context_parallel`` flex path (keys and values all-gathered, a document BlockMask, its per-document
head-tail load balancer), with the row padded to what it needs.

    torchrun --nproc-per-node N -m benchmarks.cp_versus_torch --device cuda [--tokens 131072] [--lengths FILE]
        [--heads 16] [--kv-heads 8] [--head-dim 128] [--repeats 10] [--json PATH]
    torchrun --nproc-per-node N -m benchmarks.cp_versus_torch --device cpu --lengths FILE

The row: ``--lengths`` (document lengths), else log-normal lengths filling ``--tokens`` (mu 7.5,
sigma 1.4, seed 0). Ours runs it as it is (:func:`~packing.context.plan_layout`, :func:`~packing.
context.context_attention`, the first chunk kernel that loads and passes its check on CUDA, the
masked path on a CPU). torch's load balancer cuts every document in 2N chunks, and its BlockMask
shards queries in blocks of 128: each document is padded to a multiple of 2N and the row, with one
more padding document, to a multiple of 128·N. Padding queries get no gradient.

Both are checked against each document's attention alone, on every rank's rows (real tokens only):
in fp64 on a CPU to 1e-12 (torch's flex attention has no backward on a CPU, so its forward only);
in bf16 on CUDA against fp32 SDPA, the outputs and dQ/dK/dV within 2e-2 relative (bf16 gives about
4e-3 here; a document reading another's keys gives errors of order 1). Then each is timed, forward
and backward (torch's forward only on a CPU), median of ``--repeats``, and its tokens/s per rank is
the real tokens / N / the median. Its last line (rank 0)::

    versus torch N=4: ours 41.2 ms, torch 66.0 ms a step; tokens/s per rank ours/torch 1.60x; exact: ours yes, torch yes; torch's row padded 0.74%

(``n/a`` for the ratio on a CPU, where torch's time is a forward's.) It exits 1 when either is not
exact.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.cp import document_attention, document_sdpa, lognormal_row, read_lengths, start_ranks
from benchmarks.harness import Parser, environment, run_under_torchrun
from packing import get_collator
from packing.context import batch_blocks, context_attention, plan_layout, shard
from packing.context.shard import local_index
from packing.context.varlen import chunk_kernel

CPU_TOL, CUDA_TOL = 1e-12, 2e-2
BLOCK = 128  # flex attention's BlockMask block: torch shards queries in whole blocks


def torch_padding(lens: list[int], world: int) -> list[int]:
    """The document lengths torch's per-document head-tail balancer takes for ``lens`` on ``world``
    ranks: each padded to a multiple of 2·world, then one padding document (when needed) bringing
    the row to a multiple of 128·world.

    Examples:
        >>> torch_padding([5, 8, 1], 2)
        [8, 8, 4, 236]
    """
    padded = [math.ceil(n / (2 * world)) * 2 * world for n in lens]
    short = -sum(padded) % (BLOCK * world)
    return padded + ([short] if short else [])


def _ours(q_row, k_row, v_row, d_row, lens, world, rank, device, kernel):
    """(step, local rows in the real row, leaves) of our context-parallel attention."""
    batch = get_collator("concat")([[0] * n for n in lens])
    layout = plan_layout(batch_blocks(batch), world)
    part = shard(batch, layout, rank).to(device)
    rows = local_index(layout, rank)
    q, k, v = (t[rows].to(device).requires_grad_() for t in (q_row, k_row, v_row))
    grad = d_row[rows].to(device)

    def step():
        out = context_attention(q, k, v, part, causal=True, kernel=kernel)
        out.backward(grad)
        return out

    return step, rows, (q, k, v)


class _Flex(nn.Module):
    """flex attention as a module, for torch's context-parallel hook to all-gather its keys."""

    def __init__(self, compiled: bool, gqa: bool) -> None:
        super().__init__()
        from torch.nn.attention.flex_attention import flex_attention

        self.attend = torch.compile(flex_attention) if compiled else flex_attention
        self.gqa = gqa

    def forward(self, query, key, value, block_mask=None):
        return self.attend(query, key, value, block_mask=block_mask, enable_gqa=self.gqa)


def _torch(q_row, k_row, v_row, d_row, lens, world, rank, device):
    """(step, local rows in the real row (-1: padding), leaves, padded length) of torch's flex path."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import _context_parallel_shard, _ContextParallel
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
        _PerDocumentHeadTailLoadBalancer,
    )
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import create_block_mask

    padded = torch_padding(lens, world)
    S = sum(padded)
    real = torch.full((S,), -1, dtype=torch.int64)  # padded position -> real row position
    doc = torch.empty(S, dtype=torch.int64)
    start = start_real = 0
    for d, n in enumerate(padded):
        doc[start:start + n] = d
        if d < len(lens):
            real[start:start + lens[d]] = torch.arange(start_real, start_real + lens[d])
            start_real += lens[d]
        start += n
    doc = doc.to(device)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(same_document_causal, 1, 1, S, S, device=device)

    def padded_of(t: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (1, H, S, D), zeros at padding
        out = t.new_zeros(S, *t.shape[1:])
        out[real >= 0] = t
        return out.transpose(0, 1)[None].to(device)

    mesh = init_device_mesh(device.type, (world,))
    balancer = _PerDocumentHeadTailLoadBalancer([padded], world, device)
    q, k, v, d_out, local_mask = _context_parallel_shard(
        mesh, [padded_of(t) for t in (q_row, k_row, v_row, d_row)] + [mask], [2, 2, 2, 2, 2], load_balancer=balancer)
    backward = device.type == "cuda"  # flex attention has no backward on a CPU
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    attend = parallelize_module(_Flex(device.type == "cuda", q_row.shape[1] != k_row.shape[1]), mesh,
                                _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX))
    order = balancer._generate_indices()[0].cpu()  # the balanced row: rank r holds its r-th slice
    rows = real[order[rank * S // world:(rank + 1) * S // world]]

    def step():
        out = attend(q, k, v, block_mask=local_mask)
        if backward:
            out.backward(d_out)
        return out

    return step, rows, (q, k, v), S


def _errors(parts, ref, rows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(squared error, squared reference) sums of each of ``parts`` (T_local, H, D) against
    ``ref`` at ``rows`` (real rows only)."""
    keep = rows >= 0
    out = []
    for got, want in zip(parts, ref):
        g, w = got[keep.to(got.device)].double(), want[rows[keep]].to(got.device).double()
        out.append(((g - w).square().sum(), w.square().sum()))
    return out


def _median_ms(step, device, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(args, parser: Parser) -> int:
    device, backend, rank, world, say = start_ranks(args.device)
    lens = read_lengths(args.lengths) if args.lengths else lognormal_row(args.tokens)
    T, H, Hkv, D = sum(lens), args.heads, args.kv_heads, args.head_dim
    if T < world:
        raise ValueError(f"the row has {T} tokens, fewer than {world} ranks; give longer --lengths or --tokens")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float64
    kernel = None
    if cuda:
        found = chunk_kernel(device, dtype, D)
        kernel = None if found is None else found[1]
    g = torch.Generator().manual_seed(1)
    q_row, k_row, v_row, d_row = (torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
    if cuda:  # fp32 SDPA per document on the GPU (a 128k document's written-out softmax does not fit)
        ref = [t.cpu() for t in document_sdpa(*(t.to(device, torch.float32) for t in (q_row, k_row, v_row)), lens,
                                              d_row.to(device, torch.float32))]
    else:
        leaves = [t.clone().requires_grad_() for t in (q_row, k_row, v_row)]
        out, _ = document_attention(*leaves, lens, causal=True)
        out.backward(d_row)
        ref = [out.detach()] + [t.grad for t in leaves]
    inputs = [t.to(dtype) for t in (q_row, k_row, v_row, d_row)]
    ours_step, ours_rows, ours_leaves = _ours(*inputs, lens, world, rank, device, kernel)
    torch_step, torch_rows, torch_leaves, S = _torch(*inputs, lens, world, rank, device)
    say(f"{T:,} tokens, {len(lens)} documents (longest {max(lens):,}); N={world}, {backend}, {device.type}; "
        f"{str(dtype).removeprefix('torch.')}, {H}/{Hkv} heads of {D}; ours: "
        f"{'masked path' if kernel is None else found[0]}; torch: flex attention, {S:,} positions", flush=True)

    out = ours_step()
    sums = _errors([out.detach()] + [t.grad for t in ours_leaves], ref, ours_rows)
    out = torch_step()[0].transpose(0, 1)  # (S/N, H, D)
    torch_parts = [out.detach()] + ([t.grad[0].transpose(0, 1) for t in torch_leaves] if cuda else [])
    sums += _errors(torch_parts, ref, torch_rows)
    totals = torch.tensor([[a.item(), b.item()] for a, b in sums], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    errs = (totals[:, 0] / totals[:, 1].clamp(min=1e-300)).sqrt().tolist()
    tol = CUDA_TOL if cuda else CPU_TOL
    names = ("out", "dq", "dk", "dv")
    ours_err, torch_err = dict(zip(names, errs[:4])), dict(zip(names, errs[4:]))
    ours_exact, torch_exact = max(ours_err.values()) <= tol, max(torch_err.values()) <= tol
    for who, err in (("ours", ours_err), ("torch", torch_err)):
        say(f"{who}: " + ", ".join(f"{n} rel {e:.1e}" for n, e in err.items()) + f" (tolerance {tol:g})", flush=True)
    for t in ours_leaves + torch_leaves:
        t.grad = None
    ours_ms = _median_ms(ours_step, device, args.repeats)
    torch_ms = _median_ms(torch_step, device, args.repeats)
    per_rank = lambda ms: T / world / (ms / 1e3)  # noqa: E731
    ratio = per_rank(ours_ms) / per_rank(torch_ms) if cuda else None
    padding = 100 * (S - T) / S
    record = {**environment(device), "world_size": world, "backend": backend, "tokens": T, "docs": len(lens),
              "longest": max(lens), "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": str(dtype).removeprefix("torch."),
              "ours_kernel": None if kernel is None else found[0], "ours_ms": ours_ms, "torch_ms": torch_ms,
              "torch_forward_only": not cuda, "ours_tokens_per_s_per_rank": per_rank(ours_ms),
              "torch_tokens_per_s_per_rank": per_rank(torch_ms), "ours_over_torch": ratio, "torch_positions": S,
              "torch_padding_pct": padding, "ours_errors": ours_err, "torch_errors": torch_err, "tolerance": tol,
              "ours_exact": ours_exact, "torch_exact": torch_exact, "command": parser.command(args.argv)}
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    say(f"versus torch N={world}: ours {ours_ms:.1f} ms, torch {torch_ms:.1f} ms a step; tokens/s per rank ours/torch "
        f"{'n/a' if ratio is None else f'{ratio:.2f}x'}; exact: ours {'yes' if ours_exact else 'NO'}, torch "
        f"{'yes' if torch_exact else 'NO'}; torch's row padded {padding:.2f}%", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ours_exact and torch_exact else 1


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.cp_versus_torch", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=131_072, help="the log-normal row's length (default 131072)")
    p.add_argument("--lengths", metavar="FILE", help="the row's document lengths instead, whitespace-separated ints")
    p.add_argument("--heads", type=int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps each (default 10)")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the record as JSON")
    args = p.parse_args(argv)
    args.argv = argv
    for name in ("tokens", "heads", "kv_heads", "head_dim", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} is {getattr(args, name)}; expected an int >= 1")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return run_under_torchrun(p, args, compare, module="benchmarks.cp_versus_torch", cpu_fix="use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
