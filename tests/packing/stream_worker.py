"""Run by tests/packing/test_stream_resume.py in its own process: stream packs from shards through a
StatefulDataLoader, append each pack's documents to OUT (one JSON line a pack) and save the loader's
state after every step; optionally SIGKILL itself after step KILL_AFTER, or resume from STATE first.

Usage: stream_worker.py SHARDS OUT STATE WORKERS BUFFER KILL_AFTER RESUME   (KILL_AFTER -1: never;
RESUME 1: load STATE before iterating)
"""

import json
import os
import signal
import sys

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from packing import StreamPacker
from packing.shard_reader import ShardStream

MAX_TOKENS = 128


def as_lists(pack):
    return [doc.tolist() for doc in pack]


def main(shards, out, state_path, workers, buffer, kill_after, resume):
    packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=MAX_TOKENS, buffer_size=buffer)
    loader = StatefulDataLoader(packer, batch_size=None, num_workers=workers, collate_fn=as_lists)
    if resume:
        loader.load_state_dict(torch.load(state_path, weights_only=False))
    with open(out, "a") as f:
        for step, pack in enumerate(loader, start=1):
            f.write(json.dumps(pack) + "\n")
            f.flush()
            os.fsync(f.fileno())
            tmp = state_path + ".tmp"
            torch.save(loader.state_dict(), tmp)
            os.replace(tmp, state_path)  # the state after this step, never half-written
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a preempted job


if __name__ == "__main__":
    shards, out, state, workers, buffer, kill_after, resume = sys.argv[1:]
    main(shards, out, state, int(workers), int(buffer), int(kill_after), resume == "1")
