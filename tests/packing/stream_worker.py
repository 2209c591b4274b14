"""Run by tests/packing/test_stream_resume.py in its own process: stream packs from shards through a
StatefulDataLoader, append each pack's documents to OUT (one JSON line a pack) and save the loader's
state after every step; optionally SIGKILL itself after step KILL_AFTER, or resume from STATE first.

Usage: stream_worker.py SHARDS OUT STATE WORKERS BUFFER KILL_AFTER RESUME   (KILL_AFTER -1: never;
RESUME k > 0: load the state saved after step k first). The state after step k is STATE.k.

Under torchrun (gloo) every rank does the same with OUT.<rank> and STATE.<rank>.k; after each step
the ranks all-reduce, as DDP does, so unequal pack counts would hang the run, and rank 0 kills itself.
"""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from packing import StreamPacker
from packing.data.shard_reader import ShardStream

MAX_TOKENS = 128


def as_lists(pack):
    return [doc.tolist() for doc in pack]


def main(shards, out, state_path, workers, buffer, kill_after, resume):
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
        out, state_path = f"{out}.{dist.get_rank()}", f"{state_path}.{dist.get_rank()}"
    packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=MAX_TOKENS, buffer_size=buffer)
    loader = StatefulDataLoader(packer, batch_size=None, num_workers=workers, collate_fn=as_lists)
    if resume:
        loader.load_state_dict(torch.load(f"{state_path}.{resume}"))  # weights_only: the state is plain data
    with open(out, "a") as f:
        for step, pack in enumerate(loader, start=resume + 1):
            f.write(json.dumps(pack) + "\n")
            f.flush()
            os.fsync(f.fileno())
            tmp = f"{state_path}.tmp"
            torch.save(loader.state_dict(), tmp)
            os.replace(tmp, f"{state_path}.{step}")  # the state after this step, never half-written
            if distributed:
                dist.all_reduce(torch.ones(1))  # every rank's step, as DDP's gradient all-reduce
            if step == kill_after and (not distributed or dist.get_rank() == 0):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a preempted job
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    shards, out, state, workers, buffer, kill_after, resume = sys.argv[1:]
    main(shards, out, state, int(workers), int(buffer), int(kill_after), int(resume))
