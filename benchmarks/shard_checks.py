"""What a sealed set's checks cost a reader: this tree's reader against an earlier commit's, in one run.

    python -m benchmarks.shard_checks                          # against 4ab1ff0, the reader before sets were sealed
    python -m benchmarks.shard_checks --baseline COMMIT --runs 5 --open-shards 100000

Both readers read the same shards, written once by this tree's writer (format 3; the earlier
reader ignores what it does not know). Each run is a fresh process on one core (``taskset -c 0``
where it exists), and the runs alternate old, new, old, new, so drift in the machine hits both.

- **Read:** ``benchmarks/results/data/shards.txt``'s workload, 50,000 seed documents (lengths
  U[1, 1023]), read by the map-style path (``ShardDataset`` + ``PackingSampler`` + concat) and the
  streaming path (``ShardStream`` + ``StreamPacker`` + concat). It is read at 10,000 documents a shard
  and at 50 (1,000 shards, where the per-shard checks weigh most). Reports real tokens per second.
- **Open:** a set of ``--open-shards`` one-document shards. Reports the seconds to construct
  ``ShardStream`` (which reads the index, and fingerprints the set) and ``ShardDataset`` (which
  scans every shard).

Prints each row's median and its ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Parser, positive
from benchmarks.shards import write_synthetic
from packing.data.shards import ShardWriter

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process with the reader under test first on sys.path; only APIs both readers have.
READ = """
import json, sys, time
from packing import ConcatCuSeqlens, PackingSampler, StreamPacker
from packing.data.shard_reader import ShardDataset, ShardStream
spec, path, max_tokens = sys.argv[1], sys.argv[2], 16384
collate = ConcatCuSeqlens(total_tokens=max_tokens)
tokens, start = 0, time.perf_counter()
if path == "map":
    ds = ShardDataset(spec)
    for indices in PackingSampler(ds.lengths, max_tokens=max_tokens, seed=0):
        tokens += collate([ds[i] for i in indices]).num_tokens
else:
    for pack in StreamPacker(ShardStream(spec, seed=0), max_tokens=max_tokens):
        tokens += collate(pack).num_tokens
print(json.dumps({"value": tokens / (time.perf_counter() - start)}))
"""

OPEN = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from packing.data.shard_reader import ShardDataset, ShardStream
spec, what = sys.argv[1], sys.argv[2]
start = time.perf_counter()
reader = ShardStream(spec) if what == "stream" else ShardDataset(spec)
print(json.dumps({"value": time.perf_counter() - start}))
"""


def run(code: str, tree: Path, *args: str) -> float:
    """One measurement in a fresh process that imports ``packing`` from ``tree``."""
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*pin, sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tree, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"a measurement failed in {tree}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["value"]


def baseline_tree(commit: str, into: Path) -> Path:
    """``packing/`` as it was at ``commit``, extracted under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "packing"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def one_doc_shards(out: Path, shards: int) -> float:
    """``shards`` shards of one 8-token document each; seconds taken."""
    start = time.perf_counter()
    with ShardWriter(out, vocab_size=1024, tokenizer="synthetic", shard_size=1) as writer:
        for i in range(shards):
            writer.write(f"d{i}", np.arange(1, 9, dtype=np.uint16))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.shard_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="4ab1ff0", help="the commit whose reader is the baseline (default 4ab1ff0)")
    p.add_argument("--runs", type=positive, default=5, help="alternating runs of each reader per row (default 5)")
    p.add_argument("--docs", type=positive, default=50_000, help="documents of the read workload (default 50,000)")
    p.add_argument("--open-shards", type=positive, default=100_000, help="shards of the set to open (default 100,000)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            old = baseline_tree(args.baseline, tmp / "old")
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            return p.fail(f"--baseline {args.baseline!r} could not be extracted with git archive ({e}); give a commit "
                          "of this repository")
        trees = {"baseline": old, "this tree": ROOT}
        cases = []
        for shard_size in (10_000, 50):
            spec = tmp / f"read-{shard_size}"
            write_synthetic(str(spec), args.docs, 1024, seed=0, shard_size=shard_size)
            for path in ("map", "stream"):
                cases.append((f"read {path:6} {args.docs:,} docs, {shard_size:,} a shard", READ, str(spec), path, "tok/s"))
        spec = tmp / "open"
        wrote = one_doc_shards(spec, args.open_shards)
        for what in ("stream", "dataset"):
            cases.append((f"open {what:7} {args.open_shards:,} shards (written in {wrote:.0f} s)", OPEN, str(spec),
                          what, "s"))
        for name, code, spec, arg, unit in cases:
            runs: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(args.runs):
                for label, tree in trees.items():
                    runs[label].append(run(code, tree, spec, arg))
            base = statistics.median(runs["baseline"])
            for label in trees:
                median = statistics.median(runs[label])
                rows.append({"case": name, "reader": label, "unit": unit, "median": median, "ratio": median / base,
                             "runs": runs[label]})
                print(f"{name:56} {label:9} median {median:>14,.3f} {unit:5} {median / base:6.3f}x  runs "
                      f"{[round(r, 3) if unit == 's' else round(r / 1e6, 3) for r in runs[label]]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": args.baseline, "rows": rows, "command": p.command(argv)},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
