"""A shard writer killed at a chosen point: the worker of tests/packing/test_shard_writes.py.

Usage: shard_writer_worker.py OUT_DIR DOCS SIGNAL POINT
POINT is "doc:K" (the signal arrives before document K is written) or "commit:K" (at the K-th file
the commit moves or renames, index.json's rename last). SIGNAL is INT, KILL or NONE.
"""

import os
import signal
import sys

import numpy as np

from packing.data import shards
from packing.data.shards import ShardWriter


def main(out: str, docs: str, sig: str, point: str) -> None:
    kind, at = point.split(":")
    at = int(at)
    fire = (lambda: os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))) if sig != "NONE" else (lambda: None)
    if kind == "commit":
        replace, calls = os.replace, [0]

        def replacing(src, dst):
            calls[0] += 1
            if calls[0] == at:
                fire()
            return replace(src, dst)

        shards.os.replace = replacing
    rng = np.random.default_rng(0)
    with ShardWriter(out, vocab_size=259, tokenizer="bytes", shard_size=4) as w:
        for i in range(int(docs)):
            if kind == "doc" and i == at:
                fire()
            w.write(f"d{i}", rng.integers(0, 256, 1 + i % 7).astype(np.uint16))


if __name__ == "__main__":
    main(*sys.argv[1:])
