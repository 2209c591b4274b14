"""Run by tests/packing/test_context.py under torchrun (gloo): context-parallel training of the toy
GPT over two rows (gradient accumulation), each row cut across the ranks. Rank 0 saves the summed
gradients, the loss and the unsharded logits. Usage: cp_worker.py OUT_FILE CAUSAL(0|1)"""

import os
import sys

import torch
import torch.distributed as dist

from models import GPT, GPTConfig, lm_loss
from packing import get_collator
from packing.context import batch_blocks, plan_layout, shard, unshard

CONFIG = GPTConfig(vocab_size=97, max_len=64, n_layers=2, dim=32, n_heads=4)
# Two rows: a long document with short ones and a padding tail, and mostly short documents.
ROWS = [[57, 5, 1, 12, 3], [9, 30, 2, 7, 11, 6]]
SPLIT_TOKENS = 20  # documents this long are cut across the ranks, the rest stay whole


def rows():
    g = torch.Generator().manual_seed(7)
    collate = get_collator("concat", pad_to_multiple_of=8)
    return [collate([torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lens]) for lens in ROWS]


def main(out: str, causal: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(CONFIG, attn="auto")
    batches = rows()
    layouts = [plan_layout(batch_blocks(b), world, split_tokens=SPLIT_TOKENS) for b in batches]
    parts = [shard(b, layout, rank) for b, layout in zip(batches, layouts)]
    total = sum(p.context.num_targets for p in parts)  # the global count over both rows
    loss, logits = torch.zeros(()), []
    for part in parts:
        out_logits = model(part, causal=causal)
        step = lm_loss(out_logits, part, normalizer=total)
        step.backward()
        loss += step.detach()
        logits.append(out_logits.detach())
    for p in model.parameters():  # the ranks' gradients add up to the rows'
        dist.all_reduce(p.grad)
    dist.all_reduce(loss)
    gathered = [[None] * world for _ in parts]
    for i, mine in enumerate(logits):
        dist.all_gather_object(gathered[i], mine)
    if rank == 0:
        whole = [unshard(g, layout) for g, layout in zip(gathered, layouts)]
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "loss": loss, "logits": whole,
                    "cut": [any(c.split for c in layout.chunks[0]) for layout in layouts]}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation, where gloo threads can abort the process
