"""CPU-side throughput: read shards, then collate into the concat layout, in one process (one worker).

    python -m benchmarks.shards                         # writes seed-like shards to a temp dir first
    python -m benchmarks.shards --data shards/            # a directory, or a glob 'shards/*.tar'

Three paths, each timed over every document once:
- map-style: ``ShardDataset`` + ``PackingSampler`` batches + ``ConcatCuSeqlens``, what a DataLoader
  worker does per batch with ``batch_sampler=``;
- streaming: ``ShardStream`` -> ``StreamPacker`` -> ``ConcatCuSeqlens``, what a worker does with an
  iterable dataset;
- streaming with ``StreamPacker.state_dict()`` after every pack, what torchdata's
  ``StatefulDataLoader`` does to make the stream resumable; the row also reports the state's pickled
  size and the time of one call (medians over the packs).

Reports real tokens per second against the target of 1M per worker, and against 200k tokens/s,
the fastest train step measured on an H200 (so one worker feeds it with that much margin).
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
import time

import numpy as np

from packing import ConcatCuSeqlens, PackingSampler, StreamPacker
from benchmarks.harness import Parser
from packing.data.shard_reader import ShardDataset, ShardStream
from packing.data.shards import ShardWriter

TARGET = 1_000_000
STEP_CONSUMES = 200_000


def write_synthetic(out: str, docs: int, max_len: int, seed: int, shard_size: int = 10_000) -> float:
    """Seed-distribution documents (lengths U[1, max_len - 1], ids U[1, 1023]) as shards; seconds taken."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with ShardWriter(out, vocab_size=1024, tokenizer="synthetic", shard_size=shard_size) as writer:
        for i, n in enumerate(rng.integers(1, max_len, size=docs)):
            writer.write(f"doc{i}", rng.integers(1, 1024, size=n).astype(np.uint16))
    return time.perf_counter() - start


def time_map_style(spec: str, max_tokens: int) -> tuple[float, int]:
    ds = ShardDataset(spec)
    collate = ConcatCuSeqlens(total_tokens=max_tokens)
    tokens, start = 0, time.perf_counter()
    for indices in PackingSampler(ds.lengths, max_tokens=max_tokens, seed=0):
        tokens += collate([ds[i] for i in indices]).num_tokens
    return time.perf_counter() - start, tokens


def time_streaming(spec: str, max_tokens: int, *, save_state: bool = False) -> tuple[float, int, dict[str, float]]:
    """Seconds and real tokens over one epoch; with ``save_state``, state_dict() after every pack (as
    StatefulDataLoader calls it), and the state's median pickled size and median call time (us)."""
    collate = ConcatCuSeqlens(total_tokens=max_tokens)
    packer = StreamPacker(ShardStream(spec, seed=0), max_tokens=max_tokens)
    states, times = [], []
    tokens, start = 0, time.perf_counter()
    for pack in packer:
        tokens += collate(pack).num_tokens
        if save_state:
            t = time.perf_counter()
            states.append(packer.state_dict())
            times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    if not save_state:
        return elapsed, tokens, {}
    # Pickled after the clock stops: what the loader does with a state is not the packer's cost.
    size = float(np.median([len(pickle.dumps(s)) for s in states]))
    return elapsed, tokens, {"state_bytes": size, "state_us": 1e6 * float(np.median(times))}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", metavar="SHARDS", help="shards to read (default: write seed-like ones to a temp dir)")
    p.add_argument("--docs", type=int, default=50_000, help="synthetic documents to write (default 50,000)")
    p.add_argument("--max-len", type=int, default=1024, help="synthetic lengths in [1, max_len - 1] (default 1024)")
    p.add_argument("--max-tokens", type=int, default=16384, help="pack budget (default 16,384)")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="documents per synthetic shard (default 10,000; 50 gives 1,000 shards of 50,000 documents)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec, wrote = args.data, None
            if spec is None:
                spec, wrote = tmp, write_synthetic(tmp, args.docs, args.max_len, seed=0, shard_size=args.shard_size)
            rows = [("map-style: ShardDataset + PackingSampler + concat", *time_map_style(spec, args.max_tokens), {})]
            # The two streaming rows twice each, alternating, so their difference can be read against
            # the run-to-run spread.
            for _ in range(2):
                rows += [("streaming: ShardStream + StreamPacker + concat", *time_streaming(spec, args.max_tokens)),
                         ("streaming + state_dict() every pack", *time_streaming(spec, args.max_tokens, save_state=True))]
        except ValueError as e:
            return p.fail(e)
    print(f"data: {args.data or f'{args.docs:,} synthetic seed documents'}"
          + (f" (written in {wrote:.1f} s)" if wrote is not None else "") + "; one process, as one DataLoader worker")
    print(f"{'path':52} {'real tok/s':>12} {'x 1M target':>12} {'x 200k step':>12}")
    for name, seconds, tokens, state in rows:
        rate = tokens / seconds
        print(f"{name:52} {rate:>12,.0f} {rate / TARGET:>12.2f} {rate / STEP_CONSUMES:>12.1f}")
    plain = sum(s for n, s, _, st in rows[1:] if not st), sum(t for n, s, t, st in rows[1:] if not st)
    saved = sum(s for n, s, _, st in rows[1:] if st), sum(t for n, s, t, st in rows[1:] if st)
    state = rows[-1][3]
    print(f"state: {state['state_bytes']:,.0f} bytes pickled, {state['state_us']:.0f} us per state_dict() (medians); "
          f"throughput with it {100 * (saved[1] / saved[0]) / (plain[1] / plain[0]):.1f}% of without (both runs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data or f"synthetic:{args.docs}", "max_tokens": args.max_tokens,
                       "shard_size": args.shard_size,
                       "rows": [{"path": n, "seconds": s, "tokens": t, "tokens_per_s": t / s, **st}
                                for n, s, t, st in rows],
                       "command": p.command(argv)},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
