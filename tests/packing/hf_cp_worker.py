"""Run by tests/packing/test_context.py under torchrun (gloo): a transformers model (tiny Llama,
grouped-query, packing_varlen) trained context-parallel, the model's code unchanged: each rank gets
its shard's kwargs from pack(model).kwargs. Rank 0 saves the summed gradients and both losses
(the model's own and the chunked one). ARCH gemma2: a tiny Gemma 2, whose layers alternate a 4-token
sliding window (shorter than the documents) with full attention, with logits softcapped and the
softmax scale from query_pre_attn_scalar. ARCH gpt_oss: a tiny gpt-oss, learned attention sinks in
every layer and a 6-token sliding window in every other one, experts routed per token.
Usage: hf_cp_worker.py OUT_FILE [ARCH: llama|gemma2|gpt_oss]"""

import os
import sys

import torch
import torch.distributed as dist
import transformers

from packing.context import ContextCollator
from packing.interop.hf import pack

LENS = [[40, 6, 3, 9], [13, 27, 2]]


def model(arch: str = "llama"):
    torch.manual_seed(0)
    if arch == "gemma2":
        config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                           query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                           final_logit_softcapping=None, max_position_embeddings=64,
                                           attn_implementation="packing_varlen")
        return transformers.Gemma2ForCausalLM(config)
    if arch == "gpt_oss":
        config = transformers.GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
                                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                           attn_implementation="packing_varlen")
        lm = transformers.GptOssForCausalLM(config)
        with torch.no_grad():  # sinks that take a sizeable share of each softmax, different per head
            for layer in lm.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
        return lm
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="packing_varlen")
    return transformers.LlamaForCausalLM(config)


def rows():
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(1, 97, (n,), generator=g) for n in lens] for lens in LENS]


def main(out: str, arch: str = "llama") -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lm = model(arch)
    packed = pack(lm)
    collate = ContextCollator(packed.collator, world_size=world, rank=rank, split_tokens=16)
    parts = [packed.kwargs(collate(samples)) for samples in rows()]
    counts = [kw["num_items_in_batch"] for kw in parts]
    total = sum(counts)
    own = torch.zeros(())
    for kw, count in zip(parts, counts):
        loss = lm(**kw).loss * count / total  # each row's share, weighted by its targets: one global mean
        loss.backward()
        own += loss.detach()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    chunked = torch.zeros(())
    for kw in parts:
        loss = packed.loss(kw, chunk=5, normalizer=total)
        loss.backward()
        chunked += loss.detach()
    for t in [own, chunked, *grads.values(), *(p.grad for p in lm.parameters())]:
        dist.all_reduce(t)
    if rank == 0:
        torch.save({"loss": own, "chunked": chunked, "grads": grads,
                    "chunked_grads": {n: p.grad for n, p in lm.named_parameters()}}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation, where gloo threads can abort the process
