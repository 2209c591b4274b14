"""transformers' Trainer over packed or padded documents, one step of gradient accumulation: the
helpers of tests/packing/test_hf_trainer.py, and its worker under torchrun (2 gloo ranks), where
rank 0 saves the flat parameter update. Usage: trainer_worker.py OUT_FILE {packed,padded}"""

import sys

import torch
import transformers

from packing.interop.hf import pack

LENS = [5, 31, 2, 12, 9, 1, 17, 4]  # very unequal micro-batches: a per-micro-batch mean would show
VOCAB = 97


def tiny(impl):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return transformers.LlamaForCausalLM(config)


def documents():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENS]


def padded(samples):
    """The usual padded batch: right padding, an attention mask, labels -100 on the padding."""
    longest = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def by_hand(lr, groups=None):
    """The flat SGD update of one step on the token mean over all documents' targets; with
    ``groups`` (lists of document indices), on the mean of per-group token means instead."""
    model = tiny("eager")
    docs = documents()
    losses = []
    for group in groups or [range(len(docs))]:
        total, count = 0.0, 0
        for i in group:
            logits = model(input_ids=docs[i][None]).logits[0]
            total = total + torch.nn.functional.cross_entropy(logits[:-1], docs[i][1:], reduction="sum")
            count += len(docs[i]) - 1
        losses.append(total / count)
    (sum(losses) / len(losses)).backward()
    return torch.cat([(-lr * p.grad).flatten() for p in model.parameters()])


def trained(tmp_path, model, collate, lr, **args):
    args = {"per_device_train_batch_size": 2, **args}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, gradient_accumulation_steps=4,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", **args)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    transformers.Trainer(model=model, args=args, train_dataset=documents(), data_collator=collate).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before




def main(out: str, kind: str) -> None:
    import gc
    import tempfile

    import torch.distributed as dist

    model = tiny("packing_varlen" if kind == "packed" else "sdpa")
    collate = pack(model) if kind == "packed" else padded
    with tempfile.TemporaryDirectory() as tmp:
        # 2 ranks x 1 document x 4 accumulated micro-batches: the same 8 documents in one step.
        update = trained(tmp, model, collate, 1.0, per_device_train_batch_size=1, ddp_backend="gloo")
    if dist.get_rank() == 0:
        torch.save(update, out)
    # The Trainer's DDP wrapper, in reference cycles, must be freed before the process group (see
    # ddp_worker.py): its reducer, freed last, would run gloo's destructor holding the GIL.
    gc.collect()
    dist.barrier()  # both ranks done before teardown: gloo can abort a rank that exits mid-teardown
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
