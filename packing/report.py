"""How much compute each batching strategy wastes on a set of document lengths.

For each strategy: token efficiency (real tokens / positions computed), attention efficiency
(Σ L² over real documents / attention work computed) and the batch count.

==============  =================================================================================
strategy        positions computed, per batch (attention work: the same with each row length squared)
==============  =================================================================================
``pad_max``     batch_size rows x max_len, every batch (a fixed shape), in random order
``pad_longest`` its rows x the longest, rounded up to ``pad_to_multiple_of``, random order
``bucket``      ``LengthBucketSampler``: count x longest (rounded), within ``token_budget``
``pack``        ``PackingSampler``: a row of ``token_budget``; attention is Σ L² of its documents,
                because varlen and block-diagonal kernels attend within documents only
==============  =================================================================================

Everything is numpy over whole arrays, so 10M lengths take seconds.

From the command line, before a training run::

    python -m packing.report --synthetic 100000
    python -m packing.report --lengths lengths.txt --max-len 2048 --json report.json --plot report.png
    python -m packing.report --shards shards/ --too-long truncate

Input is one of: ``--lengths FILE`` (one integer per line, or a ``.npy`` array, never unpickled),
``--shards`` (the length indexes of shards from ``python -m packing.data.shards``; no tokens are
read), or ``--synthetic N`` (the seed article's lengths, uniform in [1, max_len - 1]). Documents
longer than ``--max-len`` are split by default (``--too-long split|truncate|error``, the policy of
``packing.data.split`` that training uses), and the report counts them.

Examples:
    >>> import numpy as np
    >>> r = padding_report(np.array([3, 1, 4, 1, 5]), max_len=8, batch_size=2, token_budget=8, pad_to_multiple_of=1)
    >>> r.strategy("pad_max").efficiency == 14 / (3 * 2 * 8)
    True
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from packing.boundaries import ceil_div, round_up
from packing.cli import Parser

from packing.sampling.samplers import LengthBucketSampler, PackingSampler
from packing.data.split import CLI_FIX, TOO_LONG, plan_chunks


@dataclass
class Strategy:
    name: str
    efficiency: float  # real tokens / computed positions
    padding_fraction: float  # 1 - efficiency
    attention_efficiency: float  # Σ L² real / attention work computed
    batches: int
    real_tokens: int
    computed_tokens: int


@dataclass
class LongDocuments:
    """What happened to documents longer than ``max_len``."""

    too_long: str
    max_len: int
    long_documents: int = 0
    split_into: int = 0  # chunks made from the long documents ("split")
    truncated_tokens: int = 0  # tokens cut off ("truncate")


@dataclass
class Report:
    documents: int  # source documents, counted before any split
    real_tokens: int  # all their tokens
    long: LongDocuments
    settings: dict
    strategies: list[Strategy] = field(default_factory=list)

    def strategy(self, name: str) -> Strategy:
        return next(s for s in self.strategies if s.name == name)

    def as_dict(self) -> dict:
        return asdict(self)


def fit_lengths(lengths: np.ndarray, max_len: int, too_long: str) -> tuple[np.ndarray, LongDocuments]:
    """Make every length <= max_len with the shared policy (``packing.data.split``: the same cut
    training makes), and count what happened."""
    if too_long not in TOO_LONG:
        raise ValueError(f"--too-long is {too_long!r}; expected one of {', '.join(TOO_LONG)}")
    plan = plan_chunks(lengths, max_len, too_long, limit="--max-len ", fix=CLI_FIX)
    info = LongDocuments(too_long=too_long, max_len=max_len, long_documents=int((lengths > max_len).sum()),
                         split_into=plan.split_chunks, truncated_tokens=plan.dropped_tokens)
    return plan.length, info


def _strategy(name: str, real: np.ndarray, computed_tokens: float, computed_attention: float, batches: int) -> Strategy:
    real_tokens = int(real.sum())
    eff = real_tokens / computed_tokens
    return Strategy(name, eff, 1 - eff, float((real.astype(np.float64) ** 2).sum()) / computed_attention, batches,
                    real_tokens, int(computed_tokens))


def _per_batch(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, longest, total) per batch, vectorised over the plan."""
    sizes = np.array([len(b) for b in batches])
    flat = lengths[np.concatenate(batches)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return sizes, np.maximum.reduceat(flat, starts), np.add.reduceat(flat, starts)


def padding_report(lengths: np.ndarray, *, max_len: int, batch_size: int, token_budget: int,
                   pad_to_multiple_of: int = 64, too_long: str = "split", seed: int = 0) -> Report:
    """The four strategies on ``lengths`` (one int per document, each >= 1)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no lengths to report on; give at least one document")
    if lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"document {i} has length {int(lengths[i])}; lengths must be >= 1")
    for name, value in (("--max-len", max_len), ("--batch-size", batch_size), ("--token-budget", token_budget),
                        ("--pad-to-multiple-of", pad_to_multiple_of)):
        if value < 1:
            raise ValueError(f"{name} is {value}; expected >= 1")
    rounded = round_up(max_len, pad_to_multiple_of)
    if token_budget < rounded:
        raise ValueError(f"--token-budget {token_budget} < --max-len {max_len} rounded up to --pad-to-multiple-of "
                         f"{pad_to_multiple_of} ({rounded}): a document of max_len would not fit a batch")
    documents, total = len(lengths), int(lengths.sum())
    fitted, long_info = fit_lengths(lengths, max_len, too_long)
    settings = dict(max_len=max_len, batch_size=batch_size, token_budget=token_budget,
                    pad_to_multiple_of=pad_to_multiple_of, seed=seed)
    report = Report(documents, total, long_info, settings)
    n, B, m = len(fitted), batch_size, pad_to_multiple_of
    rng = np.random.default_rng(seed)

    # pad_max: ceil(n / B) batches of B rows x max_len, a fixed shape (the closed form).
    num = ceil_div(n, B)
    report.strategies.append(_strategy("pad_max", fitted, num * B * max_len, num * B * float(max_len) ** 2, num))

    # pad_longest: random batches, each padded to its longest, rounded up to m.
    order = fitted[rng.permutation(n)]
    starts = np.arange(0, n, B)
    width = ceil_div(np.maximum.reduceat(order, starts), m) * m
    rows = np.diff(np.append(starts, n))
    report.strategies.append(_strategy("pad_longest", fitted, float((rows * width).sum()),
                                       float((rows * width.astype(np.float64) ** 2).sum()), len(starts)))

    bucket = LengthBucketSampler(fitted, max_tokens=token_budget, pad_to_multiple_of=m, seed=seed)
    count, longest, _ = _per_batch(fitted, bucket.batches())
    width = ceil_div(longest, m) * m
    report.strategies.append(_strategy("bucket", fitted, float((count * width).sum()),
                                       float((count * width.astype(np.float64) ** 2).sum()), len(count)))

    packs = PackingSampler(fitted, max_tokens=token_budget, seed=seed).batches()
    report.strategies.append(_strategy("pack", fitted, float(len(packs) * token_budget),
                                       float((fitted.astype(np.float64) ** 2).sum()), len(packs)))
    return report


def plot_report(report: Report, lengths: np.ndarray, path: str) -> None:
    """A PNG: the length histogram beside token and attention efficiency per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    hist.hist(lengths, bins=min(100, max(10, int(np.sqrt(len(lengths))))), color="#4c72b0")
    hist.axvline(report.long.max_len, color="#c44e52", linestyle="--", label=f"max_len {report.long.max_len}")
    hist.set_title(f"{report.documents:,} documents, {report.real_tokens:,} tokens")
    hist.set_xlabel("document length (tokens)")
    hist.set_ylabel("documents")
    hist.legend(loc="lower right")
    names = [s.name for s in report.strategies]
    x = np.arange(len(names))
    tok = [100 * s.efficiency for s in report.strategies]
    att = [100 * s.attention_efficiency for s in report.strategies]
    for offset, values, label, color in ((-0.2, tok, "tokens", "#4c72b0"), (0.2, att, "attention", "#dd8452")):
        drawn = bars.bar(x + offset, values, 0.4, label=label, color=color)
        bars.bar_label(drawn, fmt="%.1f%%", fontsize=8)
    bars.set_xticks(x, names)
    bars.set_xlabel("pack: rows padded to the budget; attention within documents (varlen kernels)", fontsize=8)
    bars.set_ylim(0, 112)
    bars.set_ylabel("useful work / work computed (%)")
    s = report.settings
    bars.set_title(f"batch {s['batch_size']}, budget {s['token_budget']:,} tokens, pad x{s['pad_to_multiple_of']}")
    bars.legend(loc="upper left", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    p = Parser(prog="python -m packing.report", description="Before a training run: how much compute each batching strategy wastes on your data.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--lengths", metavar="FILE", help="one integer per line, or a .npy array")
    source.add_argument("--shards", metavar="GLOB", help="shards written by python -m packing.data.shards")
    source.add_argument("--synthetic", type=int, metavar="N", help="N lengths uniform in [1, max_len - 1]")
    p.add_argument("--max-len", type=int, default=1024, help="the longest sequence the model takes (default 1024)")
    p.add_argument("--too-long", choices=TOO_LONG, default="split",
                   help="documents over --max-len: split into chunks (default), truncate, or error")
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
            from packing.data.shard_reader import ShardDataset

            lengths, source_name = ShardDataset(args.shards).lengths, args.shards
        else:
            if args.synthetic < 1 or args.max_len < 2:
                raise ValueError("--synthetic needs N >= 1 and --max-len >= 2")
            lengths = np.random.default_rng(args.seed).integers(1, args.max_len, size=args.synthetic)
            source_name = f"synthetic: {args.synthetic:,} lengths uniform in [1, {args.max_len - 1}]"
        report = padding_report(lengths, max_len=args.max_len, batch_size=args.batch_size,
                                token_budget=args.token_budget, pad_to_multiple_of=args.pad_to_multiple_of,
                                too_long=args.too_long, seed=args.seed)
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
          + {"split": f"split into {lg.split_into:,} chunks, no token dropped",
             "truncate": f"truncated, {lg.truncated_tokens:,} tokens dropped",
             "error": "none (--too-long error)"}[lg.too_long])
    print(f"batch size {args.batch_size}, token budget {args.token_budget:,}, pad x{args.pad_to_multiple_of}")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps({**report.as_dict(), "source": source_name}, indent=2) + "\n")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
