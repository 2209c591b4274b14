"""Context-parallel training of one long packed row on N ranks: step time, tokens/s per rank,
exposed communication and the loss at every step.

    torchrun --nproc-per-node N -m benchmarks.cp_train --device cuda [--arch qwen3-0.6b] [--tokens 131072]
        [--lengths FILE] [--steps 10] [--warmup 2] [--checkpoint] [--json PATH]
    torchrun --nproc-per-node N -m benchmarks.cp_train --device cpu --arch tiny --tokens 256 --steps 3

Every rank builds the same model from ``--seed`` (``qwen3-0.6b``: the Qwen3-0.6B shape of
``benchmarks.hf``; ``tiny``: a 2-layer grouped-query Llama of width 32, for CPUs), the same row
(``--lengths``, else log-normal lengths filling ``--tokens``, mu 7.5, sigma 1.4, seed 0) with token
ids from ``--seed``, and its shard of the row (:class:`~packing.context.ContextCollator` after
``pack(model)``'s collator). A step is the model's own forward on the shard's kwargs
(``packing_varlen``, the cut documents' keys all-gathered across the ranks), the chunked loss over
the row's target count, the backward, the gradients summed across the ranks (one all-reduce a
parameter, all in flight together) and an AdamW step. The row is the same at every step, so the
loss falls; runs at N = 1 and N > 1 from the same seed give curves to compare step by step.

On CUDA each rank takes one GPU (NCCL), the model is fp32 under bf16 autocast, and one more step
runs under the profiler: its exposed communication is the time NCCL kernels run while no other
kernel or copy does, over the step's wall time. ``--checkpoint`` recomputes each layer in the
backward (transformers' gradient checkpointing; the all-gathers run again there).

Its last line (rank 0)::

    cp_train N=4: 812.3 ms/step, 40.3k tokens/s per rank, exposed communication 1.2%, loss 12.13 -> 11.02

(exposed communication ``n/a`` on a CPU). ``--json`` writes the record: every step's time and loss,
the median, tokens/s per rank, peak memory, the exposed communication and the command.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.cp import layout_words, lognormal_row, read_lengths, start_ranks
from benchmarks.harness import Parser, environment, run_under_torchrun
from packing.context import ContextCollator
from packing.context.layout import ALIGN, SPREADS

ARCHS = ("qwen3-0.6b", "tiny")


def build(arch: str, seed: int):
    """The model every rank builds alike: fp32 weights from ``seed``, ``packing_varlen``."""
    import transformers

    torch.manual_seed(seed)
    if arch == "qwen3-0.6b":
        from benchmarks.hf import HFConfig, build_config

        return transformers.Qwen3ForCausalLM(build_config(HFConfig(arch=arch), "packing_varlen"))
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
                                      attn_implementation="packing_varlen")
    return transformers.LlamaForCausalLM(config)


def exposed_us(comm: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """Microseconds of the ``comm`` intervals (start, end) that no ``other`` interval covers: the
    communication a step waits for, where overlapped communication costs nothing.

    Examples:
        >>> exposed_us([(0, 10), (20, 30)], [(5, 25)])
        10.0
        >>> exposed_us([(0, 10), (5, 15)], [])
        15.0
    """
    def union(spans):
        merged: list[list[float]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return merged

    total = 0.0
    cover = union(other)
    for a, b in union(comm):
        covered = sum(max(0.0, min(b, d) - max(a, c)) for c, d in cover)
        total += (b - a) - covered
    return float(total)


def _exposed_percent(step, step_ms: float) -> float:
    """One profiled step's exposed communication (NCCL kernels' time with no other kernel or copy
    running), as a percentage of ``step_ms``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    comm, other = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            span = (e.time_range.start, e.time_range.end)
            (comm if "nccl" in e.name.lower() else other).append(span)
    return 100 * exposed_us(comm, other) / 1e3 / step_ms


def train(args, parser: Parser) -> int:
    from packing.interop.hf import pack

    device, backend, rank, world, say = start_ranks(args.device)
    lens = read_lengths(args.lengths) if args.lengths else lognormal_row(args.tokens)
    model = build(args.arch, args.seed).to(device)
    if args.checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = pack(model)
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    samples = [torch.randint(1, vocab, (n,), generator=g) for n in lens]
    part = ContextCollator(packed.collator, world_size=world, rank=rank, spread=args.spread, align=args.align)(samples)
    kwargs = packed.kwargs(part.to(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    say(f"{sum(lens):,} tokens, {len(lens)} documents (longest {max(lens):,}); N={world}, {backend}, {device.type}; "
        f"{args.arch}" + (", activation checkpointing" if args.checkpoint else "")
        + layout_words(args.spread, args.align), flush=True)

    def step() -> torch.Tensor:
        with autocast:
            loss = packed.loss(kwargs, normalizer=kwargs["num_items_in_batch"])  # this rank's share of the row's mean
        loss.backward()
        total = loss.detach().clone()
        if world > 1:  # each rank's loss is its part of one sum: add the parts and their gradients
            works = [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]
            works.append(dist.all_reduce(total, async_op=True))
            for w in works:
                w.wait()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        loss = step()
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(ms)
        say(f"step {i}{' (warmup)' if i < args.warmup else ''}: loss {losses[-1]:.6f}, {ms:.1f} ms", flush=True)
    median = statistics.median(times)
    exposed = _exposed_percent(step, median) if device.type == "cuda" else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    per_rank = sum(lens) / world / (median / 1e3)
    record = {**environment(device), "world_size": world, "backend": backend, "arch": args.arch, "seed": args.seed,
              "tokens": sum(lens), "docs": len(lens), "longest": max(lens), "checkpoint": args.checkpoint, "spread": args.spread, "align": args.align,
              "lr": args.lr, "warmup": args.warmup, "losses": losses, "step_ms": times, "median_step_ms": median,
              "tokens_per_s_per_rank": per_rank, "peak_memory_gib": peak, "exposed_comm_pct": exposed,
              "command": parser.command(args.argv)}
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    say(f"cp_train N={world}: {median:.1f} ms/step, {per_rank / 1e3:.1f}k tokens/s per rank, exposed communication "
        f"{'n/a' if exposed is None else f'{exposed:.1f}%'}, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.cp_train", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="qwen3-0.6b", choices=ARCHS, help="the model (default qwen3-0.6b; tiny for CPUs)")
    p.add_argument("--tokens", type=int, default=131_072, help="the log-normal row's length (default 131072)")
    p.add_argument("--lengths", metavar="FILE", help="the row's document lengths instead, whitespace-separated ints")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2); their losses are recorded")
    p.add_argument("--seed", type=int, default=0, help="the weights' and token ids' seed (default 0)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW's learning rate (default 1e-4)")
    p.add_argument("--checkpoint", action="store_true", help="recompute each layer in the backward")
    p.add_argument("--spread", default="all", choices=SPREADS, help="where a cut document goes: every rank "
                   "(default) or the fewest its work needs (plan_layout's spread)")
    p.add_argument("--align", type=int, default=ALIGN, metavar="A", help="cut a document's chunks at multiples of A "
                   f"tokens from its start (a kernel's query tile: default {ALIGN}, FlashAttention's; 1 cuts at any token)")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the record as JSON")
    args = p.parse_args(argv)
    args.argv = argv
    for name in ("tokens", "steps", "align"):
        if getattr(args, name) < 1:
            p.error(f"--{name} is {getattr(args, name)}; expected an int >= 1")
    if args.warmup < 0:
        p.error(f"--warmup is {args.warmup}; expected an int >= 0")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr {args.lr:g} is out of range; expected a finite number > 0")
    return run_under_torchrun(p, args, train, module="benchmarks.cp_train", cpu_fix="use --device cpu --arch tiny")


if __name__ == "__main__":
    sys.exit(main())
