"""Before a training run: how much compute each batching strategy wastes on your data.

    python -m benchmarks.padding_report --synthetic 100000
    python -m benchmarks.padding_report --lengths lengths.txt --max-len 2048 --json report.json --plot report.png
    python -m benchmarks.padding_report --shards 'shards/shard-{000000..000009}.tar' --long truncate

Input is one of: ``--lengths FILE`` (one integer per line, or a ``.npy`` array), ``--shards`` (the
length indexes of shards from ``python -m packing.shards``; no tokens are read), or
``--synthetic N`` (the seed article's lengths, uniform in [1, max_len - 1]). Documents longer than
``--max-len`` are split by default (``--long split|truncate|drop``), and the report counts them.
See :mod:`packing.report` for what each strategy computes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from packing.cli import Parser
from packing.report import LONG_MODES, padding_report, plot_report


def read_lengths(path: str) -> np.ndarray:
    """Lengths from a ``.npy`` file (1-D integers, never unpickled) or a text file, one per line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--lengths {path!r} does not exist")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"--lengths {path!r} is not a readable .npy array ({e})") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"--lengths {path!r} holds {arr.dtype} of shape {arr.shape}; expected 1-D integers")
        values = arr.astype(np.int64)
    else:
        lines = p.read_bytes().splitlines()
        try:
            values = np.array([int(line) for line in lines if line.strip()], dtype=np.int64)
        except ValueError:
            for number, line in enumerate(lines, start=1):
                try:
                    if line.strip():
                        int(line)
                except ValueError:
                    shown = line.decode("utf-8", "replace").strip()
                    raise ValueError(f"line {number} of {p.name} is {shown!r}, not an integer length") from None
            raise
    if values.size == 0:
        raise ValueError(f"--lengths {path!r} holds no lengths")
    return values


def format_table(report) -> str:
    lines = [f"{'strategy':12} {'tokens eff':>10} {'padding':>8} {'attention eff':>13} {'batches':>10} {'computed tokens':>16}"]
    for s in report.strategies:
        lines.append(f"{s.name:12} {s.efficiency:>10.2%} {s.padding_fraction:>8.2%} {s.attention_efficiency:>13.2%} "
                     f"{s.batches:>10,} {s.computed_tokens:>16,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.padding_report", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--lengths", metavar="FILE", help="one integer per line, or a .npy array")
    source.add_argument("--shards", metavar="GLOB", help="shards written by python -m packing.shards")
    source.add_argument("--synthetic", type=int, metavar="N", help="N lengths uniform in [1, max_len - 1]")
    p.add_argument("--max-len", type=int, default=1024, help="the longest sequence the model takes (default 1024)")
    p.add_argument("--long", choices=LONG_MODES, default="split", help="documents over --max-len (default split)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per batch for pad_max/pad_longest (default 32)")
    p.add_argument("--token-budget", type=int, default=16384, help="tokens per batch for bucket/pack (default 16,384)")
    p.add_argument("--pad-to-multiple-of", type=int, default=64, help="pad_longest and bucket rounding (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the length histogram and the efficiencies")
    args = p.parse_args(argv)
    try:
        if args.lengths:
            lengths, source_name = read_lengths(args.lengths), args.lengths
        elif args.shards:
            from packing.shard_reader import ShardDataset

            lengths, source_name = ShardDataset(args.shards).lengths, args.shards
        else:
            if args.synthetic < 1 or args.max_len < 2:
                raise ValueError("--synthetic needs N >= 1 and --max-len >= 2")
            lengths = np.random.default_rng(args.seed).integers(1, args.max_len, size=args.synthetic)
            source_name = f"synthetic: {args.synthetic:,} lengths uniform in [1, {args.max_len - 1}]"
        report = padding_report(lengths, max_len=args.max_len, batch_size=args.batch_size,
                                token_budget=args.token_budget, pad_to_multiple_of=args.pad_to_multiple_of,
                                long=args.long, seed=args.seed)
        if args.plot:
            try:
                plot_report(report, lengths, args.plot)
            except ImportError:
                raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    except ValueError as e:
        return p.fail(e)
    lg = report.long
    print(f"{source_name}: {report.documents:,} documents, {report.real_tokens:,} tokens")
    print(f"longer than --max-len {lg.max_len}: {lg.long_documents:,} documents, "
          + {"split": f"split into {lg.split_into:,} chunks",
             "truncate": f"{lg.truncated_tokens:,} tokens truncated",
             "drop": f"dropped ({lg.dropped_tokens:,} tokens)"}[lg.mode])
    print(f"batch size {args.batch_size}, token budget {args.token_budget:,}, pad x{args.pad_to_multiple_of}")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps({**report.as_dict(), "source": source_name}, indent=2) + "\n")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
