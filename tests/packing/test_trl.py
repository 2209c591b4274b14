"""TRL's SFTTrainer with pack(model) as its data_collator, on a prompt-completion dataset.

TRL tokenizes each prompt and completion, builds transformers' unshifted ``labels`` with the prompt
masked (completion-only loss), and hands the rows to the collator. Packed, the loss must be the mean
over completion tokens of each document run alone, and the update must equal TRL's own padded run
(its DataCollatorForLanguageModeling) to 1e-5 in fp32; compiled with static packs, one graph.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

trl = pytest.importorskip("trl", reason="the dev extra: pip install -e '.[dev]'")
datasets = pytest.importorskip("datasets", reason="the dev extra: pip install -e '.[dev]'")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the dev extra has it)")

from equivalence import rel  # noqa: E402
from packing.interop.hf import pack  # noqa: E402

TOL = 1e-5
WORDS = [f"w{i}" for i in range(60)]
# Prompts and completions of very unequal lengths, so a mean of per-document means would differ.
PAIRS = [(3, 2), (11, 7), (2, 1), (6, 13), (9, 4), (1, 5)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def dataset():
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    rows = [{"prompt": text(p), "completion": " " + text(c)} for p, c in PAIRS]
    return datasets.Dataset.from_list(rows)


def tiny(impl):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      attn_implementation=impl, pad_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(config)


def sft(tmp_path, model, collator=None, **args):
    """One SGD step of SFTTrainer over all six documents in one batch; (update, trainer). fp32 (TRL
    turns bf16 autocast on by default, even on a CPU) and no checkpointing, as in the hand reference."""
    args = dict(dict(max_steps=1, per_device_train_batch_size=len(PAIRS)), **args)
    config = trl.SFTConfig(output_dir=str(tmp_path), learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                           weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True,
                           save_strategy="no", completion_only_loss=True, bf16=False, gradient_checkpointing=False,
                           **args)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset(), processing_class=tokenizer(),
                             data_collator=collator)
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before, trainer


def completion_mean_alone(rows):
    """The loss by hand: each document alone through eager, cross-entropy over its completion tokens,
    summed and divided by the completion tokens of all documents; and its gradient (the update at lr 1)."""
    model = tiny("eager")
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor(row["input_ids"])
        labels = torch.tensor(row["labels"])
        logits = model(input_ids=ids[None]).logits[0]
        learned = labels[1:] != -100
        total = total + torch.nn.functional.cross_entropy(logits[:-1][learned], labels[1:][learned], reduction="sum")
        count += int(learned.sum())
    loss = total / count
    loss.backward()
    return loss.item(), torch.cat([(-p.grad).flatten() for p in model.parameters()]), count


def test_sft_trainer_with_the_packed_collator_equals_trls_padded_run(tmp_path):
    model = tiny("packing_varlen")
    packed, trainer = sft(tmp_path / "packed", model, pack(model))
    rows = list(trainer.train_dataset)
    # TRL wrote transformers' convention: unshifted labels, the prompt masked with -100.
    assert all(r["labels"][0] == -100 and r["labels"][-1] == r["input_ids"][-1] for r in rows)
    loss, by_hand, completion_tokens = completion_mean_alone(rows)
    assert completion_tokens == sum(c for _, c in PAIRS) + len(PAIRS)  # each completion and its <eos>
    padded, padded_trainer = sft(tmp_path / "padded", tiny("sdpa"))
    assert type(padded_trainer.data_collator).__name__ == "DataCollatorForLanguageModeling"
    fresh = tiny("packing_varlen")  # the loss of the packed rows the trainer saw, before its step
    assert abs(fresh(**pack(fresh)(rows)).loss.item() - loss) <= TOL * loss
    assert rel(packed, by_hand) <= TOL
    assert rel(packed, padded) <= TOL
    # The test can tell a wrong reading apart: learning the prompt too is another update.
    _, everything, _ = completion_mean_alone([{**r, "labels": r["input_ids"]} for r in rows])
    assert rel(everything, by_hand) > 1e-2


def test_sft_trainer_compiled_with_static_packs_is_one_graph(tmp_path):
    # TRL scores the loss with its fused LM head, which picks the learned positions by a boolean mask
    # (a shape known only at run time) and multiplies into an out= tensor: that part breaks any graph,
    # whatever the collator. So the backbone is compiled, not the whole model: one graph over steps
    # of 2, 2 and 2 documents, never recompiled, and the head runs eagerly after it.
    model = tiny("packing_varlen")
    model.model.compile(backend="aot_eager")
    collator = pack(model, static={"total_tokens": 128, "max_seqs": 8, "max_seqlen": 32})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _, trainer = sft(tmp_path, model, collator, max_steps=3, per_device_train_batch_size=2)
    assert trainer.state.global_step == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # and no graph break
    assert not torch._dynamo.utils.counters["graph_break"]
