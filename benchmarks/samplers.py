"""Padding efficiency and planning speed of the samplers, on the seed distribution.

    python -m benchmarks.samplers                    # 100k lengths U[1, 1023], budget 16,384
    python -m benchmarks.samplers --json out.json

Efficiency is real tokens over positions computed, as :mod:`packing.report` defines it: random
batches padded to max_len or to the longest, LengthBucketSampler's count x longest, and the budget x
packs for PackingSampler and StreamPacker (a row padded to the budget). Planning time is one epoch's plan of
1M lengths, best of three, on one core. Every row is measured in this run; targets come from the
sampler issue.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from benchmarks.harness import Parser, positive
from packing import LengthBucketSampler, PackingSampler, StreamPacker
from packing.report import padding_report


def plan_seconds(cls, lengths: np.ndarray, max_tokens: int) -> float:
    best = float("inf")
    for epoch in range(3):
        sampler = cls(lengths, max_tokens=max_tokens, seed=epoch)
        start = time.perf_counter()
        len(sampler)  # plans the epoch
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=positive, default=100_000, help="documents (default 100,000)")
    p.add_argument("--max-len", type=int, default=1024, help="lengths uniform in [1, max_len - 1] (default 1024)")
    p.add_argument("--max-tokens", type=positive, default=16384, help="token budget (default 16,384)")
    p.add_argument("--batch-size", type=positive, default=32, help="for the random-batch baselines (default 32)")
    p.add_argument("--buffer-size", type=positive, default=4096, help="StreamPacker buffer (default 4096)")
    p.add_argument("--plan-docs", type=positive, default=1_000_000, help="lengths for the planning time (default 1M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.max_len < 2:
        return p.fail(ValueError(f"--max-len is {args.max_len}; lengths are uniform in [1, max_len - 1], so it needs >= 2"))
    if args.max_len - 1 > args.max_tokens:
        return p.fail(ValueError(f"--max-len {args.max_len} makes documents longer than --max-tokens {args.max_tokens}; "
                                 "raise --max-tokens"))
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(1, args.max_len, size=args.docs)
    B = args.max_tokens
    packer = StreamPacker((range(int(n)) for n in lengths), max_tokens=B, buffer_size=args.buffer_size)
    packs = sum(1 for _ in packer)
    exact = padding_report(lengths, max_len=args.max_len, batch_size=args.batch_size, token_budget=B,
                           pad_to_multiple_of=1, seed=args.seed)
    x64 = padding_report(lengths, max_len=args.max_len, batch_size=args.batch_size, token_budget=B,
                         pad_to_multiple_of=64, seed=args.seed)
    rows = [
        (f"random batches of {args.batch_size} padded to max_len", exact.strategy("pad_max").efficiency, None),
        (f"random batches of {args.batch_size} padded to the longest", exact.strategy("pad_longest").efficiency, None),
        (f"random batches of {args.batch_size} padded to the longest, x64", x64.strategy("pad_longest").efficiency, None),
        ("LengthBucketSampler", exact.strategy("bucket").efficiency, 0.97),
        ("PackingSampler", exact.strategy("pack").efficiency, 0.995),
        (f"StreamPacker, buffer {args.buffer_size}", lengths.sum() / (B * packs), 0.985),
    ]
    plan_lengths = np.random.default_rng(args.seed + 1).integers(1, args.max_len, size=args.plan_docs)
    timing = [(cls.__name__, plan_seconds(cls, plan_lengths, B)) for cls in (PackingSampler, LengthBucketSampler)]

    print(f"{args.docs:,} lengths uniform in [1, {args.max_len - 1}], budget {B:,} tokens, seed {args.seed}")
    print(f"{'strategy':50} {'efficiency':>10}  target")
    for name, eff, target in rows:
        verdict = "" if target is None else f">= {target:.1%} {'met' if eff >= target else 'MISSED'}"
        print(f"{name:50} {eff:>10.2%}  {verdict}")
    print(f"\nplanning one epoch of {args.plan_docs:,} lengths (best of 3, one core)")
    for name, seconds in timing:
        print(f"{name:50} {seconds:>9.2f}s  <= 1 s {'met' if seconds <= 1 else 'MISSED'}")
    if args.json:
        record = {
            "docs": args.docs, "max_len": args.max_len, "max_tokens": B, "seed": args.seed,
            "efficiency": [{"strategy": n, "efficiency": e, "target": t} for n, e, t in rows],
            "plan_seconds": [{"sampler": n, "docs": args.plan_docs, "seconds": s} for n, s in timing],
            "command": p.command(argv),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores_visible": len(os.sched_getaffinity(0)),
                        "python": platform.python_version(), "numpy": np.__version__},
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    missed = [n for n, e, t in rows if t is not None and e < t] + [n for n, s in timing if s > 1]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
