"""Run by tests/packing/test_context.py under torchrun (gloo): context-parallel training of the toy
GPT, each row cut across the context-parallel ranks, rows accumulated. With DATA=1 every rank is a
context-parallel rank and the gradients are summed by hand; with DATA=2 the ranks form a (data,
context) mesh, each data rank takes every other row, and DDP over all ranks averages the gradients.
With WRAP=fsdp (DATA=2) FSDP2 shards the parameters over all ranks, the context ranks folded into
its mesh as torchtitan does, and its reduce-scatter averages the gradients over every rank.
Rank 0 saves the gradients, the loss and its rows' unsharded logits.
With REGATHER=1 the shards' attention gathers the keys again in the backward (shard(regather=True)).
Usage: cp_worker.py OUT_FILE CAUSAL(0|1) DATA [WRAP: ddp|fsdp] [REGATHER: 0|1]"""

import os
import sys

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from models import GPT, GPTConfig, lm_loss
from packing import get_collator
from packing.context import batch_blocks, plan_layout, shard, unshard

CONFIG = GPTConfig(vocab_size=97, max_len=64, n_layers=2, dim=32, n_heads=4)
# Rows: a long document with short ones and a padding tail; mostly short documents; ...
ROWS = [[57, 5, 1, 12, 3], [9, 30, 2, 7, 11, 6], [3, 44, 8], [21, 21, 4, 1]]
SPLIT_TOKENS = 20  # documents this long are cut across the ranks, the rest stay whole


def rows():
    g = torch.Generator().manual_seed(7)
    collate = get_collator("concat", pad_to_multiple_of=8)
    return [collate([torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lens]) for lens in ROWS]


def main(out: str, causal: bool, data: int, wrap: str = "ddp", regather: bool = False) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (data, world // data), mesh_dim_names=("data", "context"))
    context, data_rank = mesh.get_group("context"), mesh.get_local_rank("data")
    rank, cp_world = mesh.get_local_rank("context"), world // data
    torch.manual_seed(0)
    model = GPT(CONFIG, attn="auto", context_group=context)
    if data > 1 and wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        everyone = init_device_mesh("cpu", (world,))  # data x context flattened: every rank holds a shard
        for block in model.blocks:
            fully_shard(block, mesh=everyone)
        step_model = fully_shard(model, mesh=everyone)
    else:
        step_model = DDP(model) if data > 1 else model
    batches = rows()[data_rank::data]
    layouts = [plan_layout(batch_blocks(b), cp_world, split_tokens=SPLIT_TOKENS) for b in batches]
    parts = [shard(b, layout, rank, regather=regather) for b, layout in zip(batches, layouts)]
    # The global count: every data rank's rows (each context rank of a data rank holds the same count).
    total = torch.tensor(sum(p.context.num_targets for p in parts))
    dist.all_reduce(total, group=mesh.get_group("data"))
    scale = world if data > 1 else 1  # DDP averages over every rank; the loss wants the sum
    loss, logits = torch.zeros(()), []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if wrap == "fsdp":
            step_model.set_requires_gradient_sync(last)  # accumulate unsharded, reduce-scatter once
        sync = nullcontext() if data == 1 or last or wrap == "fsdp" else step_model.no_sync()
        with sync:
            out_logits = step_model(part, causal=causal)
            step = lm_loss(out_logits, part, normalizer=total)
            (step * scale).backward()
        loss += step.detach()
        logits.append(out_logits.detach())
    if data == 1:
        for p in model.parameters():  # the context ranks' gradients add up to the rows'
            dist.all_reduce(p.grad)
    dist.all_reduce(loss)  # every rank's share of the global loss
    gathered = [[None] * cp_world for _ in parts]
    for i, mine in enumerate(logits):
        dist.all_gather_object(gathered[i], mine, group=context)
    # FSDP2's gradients are shards (DTensors): every rank joins in gathering them whole.
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        whole = [unshard(g, layout) for g, layout in zip(gathered, layouts)]
        torch.save({"grads": grads, "loss": loss, "logits": whole,
                    "rows": list(range(len(ROWS)))[data_rank::data],
                    "cut": [any(c.split for c in layout.chunks[0]) for layout in layouts]}, out)
    # DDP's reducer must not outlive the process group (see ddp_worker.py): free it first.
    del step_model, sync
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), *sys.argv[4:5], *[a == "1" for a in sys.argv[5:6]])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation, where gloo threads can abort the process
