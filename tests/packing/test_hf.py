"""Hugging Face interop: one packed row through a transformers model equals each document alone.

Small randomly initialised Llama and GPT-2 models (no download), fp32 on CPU, for every attention
implementation that packing.interop.hf accepts on a CPU: sdpa and eager (one 4-D additive mask) and
packing_varlen (cu_seq_lens kwargs). flash_attention_2/3/4 take the same cu_seq_lens kwargs as
packing_varlen but need the flash-attn package and a GPU.
"""

import pytest
from kernels_required import skip_unless
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

# These tests also hold the deprecated entry points (register, HFPackedCollator, hf_kwargs,
# causal_lm_loss) to their behaviour for the one release they remain; tests/packing/test_hf_pack.py
# tests pack(model) and pins the deprecation warnings.
pytestmark = pytest.mark.filterwarnings("ignore:.* is deprecated and will be removed in the next release:FutureWarning")

from equivalence import assert_within, errors_against, hf_each_alone as each_alone, rel  # noqa: E402
from packing.interop.hf_attention import register  # noqa: E402
from packing import get_collator  # noqa: E402
from packing.interop.hf import HFPackedCollator, block_causal_mask, hf_kwargs  # noqa: E402
from packing.kernels import varlen_kernels  # noqa: E402

TOL = 1e-5
LENS = [5, 1, 9, 4]  # a one-token document too: it predicts nothing and must not see its neighbours
IMPLEMENTATIONS = ["sdpa", "eager", register()]


def tiny(arch, impl, dim=32):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=97, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          attn_implementation=impl)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=97, n_embd=dim, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     attn_implementation=impl)
    return transformers.GPT2LMHeadModel(config)


def config(impl):
    """A tiny Llama config with ``impl``: what hf_kwargs and HFPackedCollator check and read the windows from."""
    return transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, attn_implementation=impl)


def docs(seed=0, lens=LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g) for n in lens]


# Static kwargs: every row 48 slots, at most 6 documents of at most 16 tokens. The batches differ in
# document count, lengths, longest document and padding tail, as a sampler's packs do.
STATIC = dict(total_tokens=48, max_seqs=6, max_seqlen=16)
STATIC_LENS = [[5, 1, 9, 4], [16, 16, 16], [3], [7, 7, 7, 7, 7, 7]]


def compiled(arch, impl, dim=32, **options):
    """tiny() compiled in one graph (fullgraph=True: any graph break is an error)."""
    model = tiny(arch, impl, dim=dim)
    # GPT2LMHeadModel has no loss_type that transformers recognises, and the warning it logs on
    # every call breaks the graph (transformers 5.23); naming the loss it falls back to avoids that.
    model.loss_type = "ForCausalLM"
    torch._dynamo.reset()
    return model, torch.compile(model, fullgraph=True, **options)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pad", [None, 32], ids=["exact", "padded-row"])
def test_packed_row_equals_each_document_alone(arch, impl, pad):
    model = tiny(arch, impl)
    samples = docs()
    # The reference runs each document alone through the same weights; a lone document needs no mask.
    ref_logits, ref_loss, ref_grads = each_alone(tiny(arch, "sdpa"), samples)
    batch = get_collator("concat", pad_to_multiple_of=pad)(samples)
    out = model(**hf_kwargs(batch, model))
    out.loss.backward()
    assert_within(errors_against(batch, out.logits, out.loss, model, ref_logits, ref_loss, ref_grads), TOL)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_position_ids_alone_would_mix_documents(arch):
    # Why hf_kwargs never hands sdpa or eager a packed row without a mask: it is silently wrong.
    model = tiny(arch, "sdpa").eval()
    samples = docs()
    with torch.no_grad():
        ref = torch.cat([model(input_ids=s[None]).logits[0] for s in samples])
        batch = get_collator("concat")(samples)
        mixed = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
    assert rel(mixed, ref) > 1e-2


def test_labels_never_cross_a_document():
    batch = get_collator("concat", pad_to_multiple_of=8)([[11, 12], [21, 22, 23]])
    kw = hf_kwargs(batch, register())
    assert kw["input_ids"].tolist() == [[11, 12, 21, 22, 23, 0, 0, 0]]
    assert kw["labels"].tolist() == [[-100, 12, -100, 22, 23, -100, -100, -100]]
    assert kw["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 0, 0]]
    # The padding tail is a block of its own, so a varlen kernel computes (finite) rows for it.
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 5, 8] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 3


def test_masks_for_sdpa_and_eager():
    batch = get_collator("concat")([[1, 2], [3, 4, 5]])
    expected = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    assert expected.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    # One additive mask for both (0 where allowed): eager adds a bool mask to its scores, so kwargs
    # for sdpa fed to an eager model would have been silently wrong.
    assert torch.equal(hf_kwargs(batch, config("sdpa"))["attention_mask"], hf_kwargs(batch, config("eager"))["attention_mask"])
    assert torch.equal(hf_kwargs(batch, config("sdpa"))["attention_mask"][0, 0] == 0, expected)
    additive = hf_kwargs(batch, config("eager"), mask_dtype=torch.bfloat16)["attention_mask"]
    assert additive.dtype == torch.bfloat16 and additive.shape == (1, 1, 5, 5)
    assert torch.equal(additive[0, 0] == 0, expected)
    assert "cu_seq_lens_q" not in hf_kwargs(batch, config("sdpa"))
    # Given a config (whose dtype is the checkpoint's: None here), eager's mask is float32.
    assert config("eager").dtype is None
    assert HFPackedCollator(config("eager"))([[1, 2], [3, 4, 5]])["attention_mask"].dtype == torch.float32
    assert HFPackedCollator(tiny("llama", "eager").to(torch.bfloat16))([[1, 2]])["attention_mask"].dtype == torch.bfloat16


def test_matches_data_collator_with_flattening():
    # The incumbent: the same tokens, positions, labels and boundaries on the same documents. Ours
    # differs in what it refuses (sdpa/eager without a mask, a non-packed batch) and in padding tails.
    samples = docs()
    theirs = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(
        [{"input_ids": s.tolist()} for s in samples])
    ours = hf_kwargs(get_collator("concat")(samples), config("flash_attention_2"))
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[key].long(), theirs[key].long()), key
    assert ours["max_length_q"] == int(theirs["max_length_q"])


def test_refusals_say_how_to_fix():
    packed = get_collator("concat")([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"the packed kwargs need a packed batch, got layout 'padded'; collate with "
                                         r"get_collator\('concat'\)"):
        hf_kwargs(get_collator("pad_longest")([[1, 2, 3]]), config("sdpa"))
    with pytest.raises(ValueError, match=r"attn_implementation 'flex_attention' is refused: .* it would attend across "
                                         r"them silently; load the model with one of flash_attention_2"):
        hf_kwargs(packed, "flex_attention")
    with pytest.raises(ValueError, match=r"attn_implementation 'my_kernel' is refused"):
        HFPackedCollator("my_kernel")
    with pytest.raises(TypeError, match=r"expected a transformers model or config \(with _attn_implementation\) or an "
                                        r"implementation name, got int"):
        hf_kwargs(packed, 3)
    with pytest.raises(TypeError, match=r"the packed kwargs take a packing.Batch, got dict"):
        hf_kwargs({"input_ids": None}, config("sdpa"))


def test_packing_varlen_refuses_what_it_cannot_compute():
    model = tiny("gpt2", register())
    batch = get_collator("concat")([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"'packing_varlen' needs cu_seq_lens_q and max_length_q, and GPT2Attention "
                                         r"called it without them: either the model's kwargs did not come from "
                                         r"packing.interop.hf.pack\(model\)"):
        model(input_ids=batch.input_ids)
    kwargs = hf_kwargs(batch, model)
    with pytest.raises(ValueError, match=r"got cu_seq_lens_k other than cu_seq_lens_q; a packed row attends each "
                                         r"document to itself"):
        model(**{**kwargs, "cu_seq_lens_k": kwargs["cu_seq_lens_q"].flip(0)})
    with pytest.raises(ValueError, match=r"got max_length_k=99 and max_length_q=3"):
        model(**{**kwargs, "max_length_k": 99})
    model(**{**kwargs, "cu_seq_lens_k": kwargs["cu_seq_lens_q"].clone()})  # equal boundaries, another tensor
    dropout = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_embd=32, n_layer=1, n_head=4, attn_pdrop=0.1, attn_implementation=register())).train()
    with pytest.raises(ValueError, match=r"'packing_varlen' has no attention dropout, got dropout=0.1; set the config's"):
        dropout(**hf_kwargs(batch, dropout))


def test_collator_feeds_a_dataloader():
    model = tiny("llama", register())
    loader = torch.utils.data.DataLoader(docs(), batch_size=4, collate_fn=HFPackedCollator(register(), pad_to_multiple_of=8))
    kwargs = next(iter(loader))
    assert kwargs["input_ids"].shape == (1, 24) and kwargs["cu_seq_lens_q"].tolist() == [0, 5, 6, 15, 19, 24]
    assert torch.isfinite(model(**kwargs).loss)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_explicit_targets_keep_the_last_one(impl):
    # (inputs, targets) pairs give the last token a target too; the shifted labels cannot hold the
    # row's last one, so hf_kwargs also passes our labels as shift_labels. Without them the loss
    # was 1.4e-5 off on a 4-document GPT-2 batch (benchmarks.hf, --dim 64 --layers 2).
    model, alone = tiny("gpt2", impl), tiny("gpt2", "sdpa")  # the same weights
    g = torch.Generator().manual_seed(1)
    pairs = [(t[:-1], t[1:]) for t in (torch.randint(1, 97, (n + 1,), generator=g) for n in LENS)]
    with torch.no_grad():
        ref = torch.cat([alone(input_ids=x[None]).logits[0] for x, _ in pairs])
        loss = torch.nn.functional.cross_entropy(ref, torch.cat([y for _, y in pairs]))
        out = model(**hf_kwargs(get_collator("concat")(pairs), model))
    assert rel(out.loss, loss) <= TOL


CUDA_IMPLEMENTATIONS = ["packing_varlen", "flash_attention_2", "flash_attention_3", "flash_attention_4"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", CUDA_IMPLEMENTATIONS)
def test_cuda_varlen_implementations_match_fp32_reference(impl):
    # The cu_seq_lens kwargs through transformers' own flash integrations (where their package is
    # installed) and through packing_varlen, in bf16, against each document alone in fp32: 2e-2.
    try:
        model = tiny("llama", impl, dim=256).cuda()  # head dim 64, which every flash kernel takes
    except (ImportError, ValueError) as e:  # transformers refuses an implementation whose package is missing
        kernel = {"flash_attention_2": "fa2", "flash_attention_3": "fa3", "flash_attention_4": "fa4"}.get(impl, impl)
        skip_unless(kernel, False, f"{impl} is not usable here: {str(e).splitlines()[0]}")
    assert_bf16_packed_matches_fp32_alone(model, tiny("llama", "sdpa", dim=256).cuda())


def assert_bf16_packed_matches_fp32_alone(model, reference):
    """``model`` on one packed row of docs() in bf16 autocast, its logits, loss and gradients within
    2e-2 of ``reference`` (the same weights, fp32) run on each document alone."""
    samples = [s.cuda() for s in docs()]
    ref_logits, ref_loss, ref_grads = each_alone(reference, samples)
    batch = get_collator("concat", pad_to_multiple_of=32)([s.cpu() for s in samples]).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**hf_kwargs(batch, model))
    out.loss.backward()
    assert_within(errors_against(batch, out.logits, out.loss, model, ref_logits, ref_loss, ref_grads), 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_compiled_static_rows_match_fp32_reference(arch):
    # The compiled recipe on the GPU (inductor, bf16 autocast) with packing_varlen's kernel (FA4
    # where it loads): one graph, no recompile, every pack within 2e-2 of its documents alone in fp32.
    model, step = compiled(arch, register(), dim=256)  # head dim 64, which every flash kernel takes
    model.cuda()
    reference = tiny(arch, "sdpa", dim=256).cuda()
    collate = HFPackedCollator(register(), **STATIC)
    for i, lens in enumerate(STATIC_LENS):
        samples = docs(seed=i, lens=lens)
        ref_logits, ref_loss, ref_grads = each_alone(reference, [s.cuda() for s in samples])
        batch = collate.collator(samples).to("cuda")
        with torch._dynamo.config.patch(error_on_recompile=i > 0), torch.autocast("cuda", dtype=torch.bfloat16):
            out = step(**hf_kwargs(batch, register()))
        out.loss.backward()
        assert_within(errors_against(batch, out.logits, out.loss, model, ref_logits, ref_loss, ref_grads), 2e-2)
        model.zero_grad()


def test_trainer_takes_the_collator(tmp_path):
    # transformers' Trainer with HFPackedCollator as its data_collator: it moves the kwargs, counts
    # the targets from shift_labels, and its loss is ours (one step at learning rate 0; the packed
    # loss does not depend on the order the sampler puts the documents in).
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the dev extra has it)")
    model = tiny("gpt2", register())
    collate = HFPackedCollator(register())
    samples = docs() + docs(seed=1)
    with torch.no_grad():
        expected = model(**collate(samples)).loss.item()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(samples),
                                          learning_rate=0.0, logging_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=samples, data_collator=collate)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # llama: grouped-query attention, 4 query heads on 2 kv heads
def test_compiled_static_rows_compile_once_and_equal_each_document_alone(arch):
    # The compiled recipe: static kwargs into a compiled model. One graph, no recompile across packs
    # of other document counts, and every pack still equals its documents run alone (fp32, 1e-5).
    model, step = compiled(arch, register(), backend="aot_eager")
    collate = HFPackedCollator(register(), **STATIC)
    reference = tiny(arch, "sdpa")  # the same weights
    for i, lens in enumerate(STATIC_LENS):
        samples = docs(seed=i, lens=lens)
        ref_logits, ref_loss, ref_grads = each_alone(reference, samples)
        batch = collate.collator(samples)
        kwargs = hf_kwargs(batch, register())  # what collate(samples) returns, without collating twice
        assert kwargs["input_ids"].shape == (1, 48) and kwargs["cu_seq_lens_q"].shape == (6 + 3 + 1,)
        assert kwargs["max_length_q"] == 16
        tail = slice(batch.num_tokens, None)  # the padding slots: no target, and blocks of their own
        assert (kwargs["labels"][0, tail] == -100).all() and (kwargs["shift_labels"][0, tail] == -100).all()
        assert kwargs["cu_seq_lens_q"][len(lens)].item() == batch.num_tokens
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = step(**kwargs)
            out.loss.backward()
        assert out.past_key_values is None  # use_cache=False: no DynamicCache, whose guards recompiled
        assert torch.isfinite(out.logits).all()
        assert_within(errors_against(batch, out.logits, out.loss, model, ref_logits, ref_loss, ref_grads), TOL)
        model.zero_grad()


def test_static_kwargs_refusals_say_how_to_fix():
    with pytest.raises(ValueError, match=r"static boundaries \(max_seqs, max_seqlen\) are for varlen implementations "
                                         r"\(.*\), not 'sdpa': it takes a \(T, T\) mask, whose shape is fixed by "
                                         r"total_tokens alone; drop max_seqs and max_seqlen"):
        HFPackedCollator(config("sdpa"), **STATIC)
    static = get_collator("concat", **STATIC)([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"not 'eager': it takes a \(T, T\) mask"):
        hf_kwargs(static, config("eager"))
    collate = HFPackedCollator(register(), **STATIC)
    # Never truncated: a pack over either limit is refused with the limit and the fix.
    with pytest.raises(ValueError, match=r"batch has 7 sequences > max_seqs 6; raise max_seqs or cap the sampler's "
                                         r"documents per batch \(PackingSampler\(max_seqs=...\)\)"):
        collate(docs(lens=[2] * 7))
    with pytest.raises(ValueError, match=r"batch has 49 tokens > total_tokens 48; raise total_tokens"):
        collate(docs(lens=[16, 16, 16, 1]))
    with pytest.raises(ValueError, match=r"batch holds a sequence of length 17 > max_seqlen 16; raise max_seqlen or "
                                         r"split long documents"):
        collate(docs(lens=[17]))
    # total_tokens alone keeps the mask's shape fixed, and sdpa takes it.
    assert HFPackedCollator(config("sdpa"), total_tokens=48)([[1, 2, 3]])["attention_mask"].shape == (1, 1, 48, 48)


def test_trainer_compiles_once(tmp_path):
    # transformers' Trainer with torch_compile=True and static kwargs from HFPackedCollator: steps
    # of 4, 4 and 2 documents (the last batch is short) run on the first compilation.
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the dev extra has it)")
    model = tiny("llama", register())
    samples = docs(lens=[5, 9, 1, 12, 3, 16, 8, 2, 11, 6])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no", torch_compile=True, torch_compile_backend="aot_eager")
    counts = []

    class Counting(HFPackedCollator):
        def __call__(self, batch):
            counts.append(len(batch))
            return super().__call__(batch)

    trainer = transformers.Trainer(model=model, args=args, train_dataset=samples,
                                   data_collator=Counting(register(), **STATIC))
    use_cache, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        use_cache.append(inputs["use_cache"])  # what the Trainer hands the model
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # the first compilation is not a recompile
        trainer.train()
    assert sorted(counts) == [2, 4, 4] and use_cache == [False] * 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # and no graph break


def test_out_of_vocabulary_ids_are_named_before_the_embedding():
    # torch's bare IndexError from the embedding named no id, position or document.
    model = tiny("llama", register())  # vocab_size 97
    samples = [torch.tensor([5, 6, 7]), torch.tensor([8, 97, 9, 120])]
    with pytest.raises(ValueError, match=r"token id 97 at position 4 of the packed row \(document 1\) is >= the model's "
                                         r"vocab_size 97 \(2 such ids in the row\); tokenize with the model's tokenizer"):
        HFPackedCollator(model)(samples)
    with pytest.raises(ValueError, match=r"token id 97 at position 4"):
        HFPackedCollator(register(), vocab_size=97)(samples)
    with pytest.raises(ValueError, match=r"vocab_size 97"):
        hf_kwargs(get_collator("concat")(samples), model)
    assert HFPackedCollator(model)(samples[:1])["input_ids"].tolist() == [[5, 6, 7]]


def test_a_row_without_targets_is_not_silent():
    with pytest.warns(UserWarning, match=r"this packed row has no target tokens \(all 2 documents are one token long\)"):
        HFPackedCollator(register())([[5], [6]])


def test_register_takes_only_kernels_that_load():
    import packing.interop.hf_attention as hf_attention

    here = list(varlen_kernels()) if torch.cuda.is_available() else []
    try:
        with pytest.raises(ValueError, match=r"kernels=\['flash-attn-9'\]: \['flash-attn-9'\] does not load here; "
                                             r"the varlen kernels that load here are .*leave kernels=None"):
            register(["flash-attn-9"])
        with pytest.raises(ValueError, match=r"kernels=\[\]: names no kernel"):
            register([])
        with pytest.raises(TypeError, match=r"a sequence of names, got the string 'torch.varlen_attn'; "
                                            r"write \['torch.varlen_attn'\]"):
            register("torch.varlen_attn")
        if here:  # the last kernel alone is the only one a layer may take
            register(here[-1:])
            assert hf_attention.kernel_name(head_dim=128) == here[-1]
    finally:
        register()  # every kernel again, for the tests after this one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["flash-attn-3", "flash-attn-4", "flash-attn-2", "torch.varlen_attn"])
def test_each_kernel_at_head_dim_128_matches_fp32_reference(kernel):
    # Qwen3's attention shape (head dimension 128, grouped-query 4 / 2, q and k norms) through one
    # varlen kernel at a time, as register(kernels=...) and benchmarks.hf --kernel run it: bf16
    # against each document alone in fp32, 2e-2.
    import packing.interop.hf_attention as hf_attention

    short = {"flash-attn-3": "fa3", "flash-attn-4": "fa4", "flash-attn-2": "fa2"}.get(kernel)
    here = varlen_kernels()
    if short is not None:
        skip_unless(short, kernel in here, f"{kernel} does not load here")
    name = register([kernel])
    try:
        def qwen3(impl):
            torch.manual_seed(0)
            return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
                vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=128, max_position_embeddings=64, attn_implementation=impl)).cuda()

        assert_bf16_packed_matches_fp32_alone(qwen3(name), qwen3("sdpa"))
        assert hf_attention.last_kernel == kernel
    finally:
        register()


def test_kernel_note_compiles_inside_activation_checkpointing():
    # The record of which kernel ran is set while dynamo traces, not in the graph: inside
    # checkpointing's higher-order op a side effect broke the graph (H200, 3 graphs, 2.8x the step).
    import torch.utils.checkpoint

    from packing.interop import hf_attention

    def layer(x):
        hf_attention.note_kernel("traced-kernel")
        return (x * 2).sin()

    torch._dynamo.reset()
    hf_attention.last_kernel = None
    f = torch.compile(lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum(), fullgraph=True)
    x = torch.randn(8, requires_grad=True)
    f(x).backward()
    assert hf_attention.last_kernel == "traced-kernel"
    assert torch.allclose(x.grad, 2 * (2 * x.detach()).cos())
    hf_attention.note_kernel("eager-kernel")
    assert hf_attention.last_kernel == "eager-kernel"
    torch._dynamo.reset()
