"""Run by tests/packing/test_distributed.py under torchrun: one DDP step over 2 micro-batches per
rank with globally normalised loss; rank 0 saves the gradients. Usage: ddp_worker.py OUT_FILE"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from models import GPT, GPTConfig, lm_loss
from packing import SyntheticDocs, get_collator
from packing.distributed import global_num_targets, loss_scale

CONFIG = GPTConfig(vocab_size=97, max_len=64, n_layers=2, dim=32, n_heads=4)
DOCS = 10


def documents():
    return SyntheticDocs(DOCS, max_len=CONFIG.max_len, vocab_size=CONFIG.vocab_size, seed=4)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(GPT(CONFIG, attn="naive"))
    docs = documents()
    mine = [docs[i] for i in range(rank, DOCS, world)]  # ranks get different documents and counts
    collate = get_collator("concat")
    micro = [collate(mine[: len(mine) // 2]), collate(mine[len(mine) // 2 :])]
    total = global_num_targets(sum(b.num_targets for b in micro), "cpu")
    with model.no_sync():
        (lm_loss(model(micro[0]), micro[0], normalizer=total) * loss_scale()).backward()
    (lm_loss(model(micro[1]), micro[1], normalizer=total) * loss_scale()).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    # DDP's reducer holds the process group. Freed after destroy_process_group, it would be the group's
    # last owner and run gloo's destructor holding the GIL, which joins a gloo thread that needs the
    # GIL to free its last work: a deadlock, now and then. Freed first, the group outlives it.
    del model
    dist.barrier()  # both ranks done before teardown: gloo can abort a rank that exits mid-teardown
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter finalisation, where gloo threads can abort the process (see benchmarks.varlen).
    sys.stdout.flush()
    os._exit(0)
