"""``packing.interop.hf.pack``: one object per transformers model that collates, makes kwargs,
computes the loss and names each layer's kernel; each model keeps its own kernels; the old entry
points are thin deprecated wrappers over it."""

import pickle

import pytest
import torch
from kernels_required import skip_unless

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

from equivalence import hf_each_alone, rel  # noqa: E402
from packing import get_collator  # noqa: E402
from packing.interop import hf_attention  # noqa: E402
from packing.interop.hf import HFPacking, checked_kwargs, pack  # noqa: E402

TOL = 1e-5
LENS = [5, 1, 9, 4]
STATIC = {"total_tokens": 48, "max_seqs": 6, "max_seqlen": 16}


def tiny(arch="llama", impl="packing_varlen", dim=32, **extra):
    torch.manual_seed(0)
    if arch == "gemma2":  # the attention softcap stays; the final one is the loss refusal's (tested below)
        extra = {"final_logit_softcapping": None, **extra}
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=97, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          attn_implementation=impl, **extra)
        return transformers.LlamaForCausalLM(config)
    if arch == "gemma2":  # softcapped attention, alternating sliding and full layers, a window shorter than a document
        config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                           max_position_embeddings=64, attn_implementation=impl, **extra)
        return transformers.Gemma2ForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     attn_implementation=impl, **extra)
    return transformers.GPT2LMHeadModel(config)


def docs(lens=LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g) for n in lens]


@pytest.mark.parametrize("static", [None, STATIC], ids=["dynamic", "static"])
@pytest.mark.parametrize("impl", ["packing_varlen", "sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_pack_is_each_document_alone_loss_and_gradients(arch, impl, static):
    if static is not None and impl != "packing_varlen":
        pytest.skip("static rows are for varlen implementations (refused for masks: tested below)")
    if arch == "gemma2" and impl == "sdpa":
        pytest.skip("transformers has no sdpa for Gemma 2")
    samples = docs()
    model = tiny(arch, impl)
    packed = pack(model, static=static)
    kwargs = packed(samples)
    if static is not None:
        assert kwargs["input_ids"].shape == (1, 48) and kwargs["max_length_q"] == 16
    out = model(**kwargs)
    out.loss.backward()
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_logits, ref_loss, ref_grads = hf_each_alone(tiny(arch, "eager"), samples)  # the same weights, alone
    n = sum(LENS)
    assert rel(out.logits[0, :n], torch.cat(ref_logits)) <= TOL and rel(out.loss, ref_loss) <= TOL
    assert ref_grads.keys() == {name for name, p in model.named_parameters() if got[name] is not None}
    worst = max(rel(got[name], ref) for name, ref in ref_grads.items())
    assert worst <= TOL, worst
    # The chunked loss is the model's own, gradients included.
    model.zero_grad()
    chunked = packed.loss(kwargs, chunk=7)
    chunked.backward()
    assert rel(chunked, out.loss) <= TOL
    assert max(rel(p.grad, ref_grads[name]) for name, p in model.named_parameters() if p.grad is not None) <= TOL


@pytest.mark.parametrize("static", [None, {"total_tokens": 64, "max_seqs": 8, "max_seqlen": 10}], ids=["dynamic", "static"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_compiled_on_a_cpu_gathers_the_documents_without_a_row_mask(arch, static, monkeypatch):
    # Compiled on a CPU, the documents are gathered on the device into rows of max_length_q slots
    # (where blocks x max_length_q² is under T², as here): no (T, T) mask (its builder raises
    # here), and each document as if alone, loss and gradients.
    def no_row_mask(*args, **kwargs):
        raise AssertionError("the compiled CPU path built a (T, T) mask")

    monkeypatch.setattr(hf_attention, "block_causal_mask", no_row_mask)
    torch._dynamo.reset()
    model = tiny(arch)
    packed, step = pack(model, static=static), torch.compile(model, fullgraph=True)
    for seed, lens in enumerate(([9, 8, 9, 7, 8, 9, 6], [7, 10, 9, 8, 9], [6, 9, 8, 10, 7, 9, 5])):
        samples = docs(lens, seed)
        out = step(**packed(samples))
        out.loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        ref_logits, ref_loss, ref_grads = hf_each_alone(tiny(arch, "eager"), samples)
        assert rel(out.logits[0, :sum(lens)], torch.cat(ref_logits)) <= TOL and rel(out.loss, ref_loss) <= TOL
        assert max(rel(got[name], ref) for name, ref in ref_grads.items()) <= TOL
    torch._dynamo.reset()


def test_kwargs_of_a_batch_equal_the_collated_ones_and_the_checked_path():
    model = tiny()
    packed = pack(model)
    batch = get_collator("concat")(docs())
    a, b, c = packed(docs()), packed.kwargs(batch), checked_kwargs(batch, model)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
        else:
            assert a[key] == b[key] == c[key], key
    assert packed.collator is not None and "packing_varlen" in repr(packed)


def test_layer_kernels_name_each_attention_layer():
    assert pack(tiny()).layer_kernels() == {"model.layers.0.self_attn": "cpu: sdpa, documents gathered",
                                            "model.layers.1.self_attn": "cpu: sdpa, documents gathered"}
    assert set(pack(tiny("gemma2")).layer_kernels().values()) == {"cpu: softmax written out, documents gathered"}
    assert pack(tiny(impl="sdpa")).layer_kernels() == {"*": "transformers sdpa"}
    model = tiny()
    model.train()
    model.model.layers[0].train(False)
    pack(model).layer_kernels()
    assert model.training and not model.model.layers[0].training  # the probe leaves each module's mode as it was


def test_a_model_switched_to_another_implementation_gets_its_kwargs():
    model = tiny()
    packed = pack(model)
    assert "cu_seq_lens_q" in packed(docs())
    model.set_attn_implementation("eager")
    kwargs = packed(docs())
    assert "cu_seq_lens_q" not in kwargs and kwargs["attention_mask"].shape == (1, 1, 19, 19)
    assert packed.implementation == "eager"


def test_compiled_model_is_unwrapped():
    model = tiny()
    packed = pack(torch.compile(model))
    assert packed.model is model


def test_refusals_name_the_value_and_the_fix():
    with pytest.raises(TypeError, match=r"pack takes a transformers model \(a PreTrainedModel\), got LlamaConfig"):
        pack(tiny().config)
    with pytest.raises(ValueError, match=r"kernels=\['torch.varlen_attn'\] chooses packing_varlen's kernels, but this "
                                         r"model runs 'sdpa'; load it with attn_implementation='packing_varlen'"):
        pack(tiny(impl="sdpa"), kernels=["torch.varlen_attn"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"packing_varlen kernels=\['torch.varlen_attn'\]: \['torch.varlen_attn'\] "
                                             r"does not load here; the varlen kernels that load here are none \(no CUDA\)"):
            pack(tiny(), kernels=["torch.varlen_attn"])
    with pytest.raises(TypeError, match=r"a sequence of names, got the string 'torch.varlen_attn'; write "
                                        r"\['torch.varlen_attn'\]"):
        pack(tiny(), kernels="torch.varlen_attn")
    with pytest.raises(ValueError, match=r"static boundaries \(max_seqs, max_seqlen\) are for varlen implementations"):
        pack(tiny(impl="sdpa"), static=STATIC)
    with pytest.raises(TypeError, match=r"static takes a mapping \{'total_tokens': T, 'max_seqs': S, 'max_seqlen': L\}, "
                                        r"got int"):
        pack(tiny(), static=48)
    with pytest.raises(ValueError, match=r"static needs exactly total_tokens, max_seqs and max_seqlen; missing "
                                         r"\['max_seqlen'\]; unknown \['max_len'\]"):
        pack(tiny(), static={"total_tokens": 48, "max_seqs": 6, "max_len": 16})
    with pytest.raises(TypeError, match=r"pack takes max_seqs in static=\{...\}, not as a keyword of its own"):
        pack(tiny(), max_seqs=6)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_len'"):
        pack(tiny(), max_len=6)
    with pytest.raises(ValueError, match=r"attn_implementation 'flex_attention' is refused"):
        pack(tiny(impl="flex_attention"))
    gemma2 = tiny("gemma2", final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM has final_logit_softcapping=30.0, which the chunked loss "
                                         r"does not apply after the LM head; use model\(\*\*kwargs\).loss"):
        pack(gemma2).loss(pack(gemma2)(docs()))
    with pytest.raises(ValueError, match=r"token id 200 at position 1 of the packed row \(document 0\) is >= the model's "
                                         r"vocab_size 97"):
        pack(tiny())([[1, 200, 3]])


def test_a_worker_copy_collates_without_the_model():
    model = tiny()
    packed = pack(model, static=STATIC)
    copy = pickle.loads(pickle.dumps(packed))
    assert copy.model is None
    a, b = packed(docs()), copy(docs())
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    with pytest.raises(ValueError, match=r"HFPacking.loss needs the model, and this copy \(a DataLoader worker's\) has "
                                         r"none"):
        copy.loss(b)
    loader = torch.utils.data.DataLoader([docs()[i] for i in range(4)], batch_size=2, collate_fn=packed, num_workers=1)
    assert [b["input_ids"].shape for b in loader] == [(1, 48), (1, 48)]


def test_each_model_keeps_its_own_kernels(monkeypatch):
    # Two kernels "load" (stand-ins: this runs on a CPU); each model is switched to the
    # implementation of its own list, and that implementation resolves to that list alone.
    import packing.kernels

    fake = {"flash-attn-2": lambda *a, **k: None, "torch.varlen_attn": lambda *a, **k: None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(packing.kernels, "varlen_kernels", lambda: dict(fake))
    a, b, c = tiny(), tiny(), tiny()
    pa = pack(a, kernels=["flash-attn-2"])
    pb = pack(b, kernels=["torch.varlen_attn", "flash-attn-2"])
    pc = pack(c)
    assert (a.config._attn_implementation, b.config._attn_implementation, c.config._attn_implementation) == \
        ("packing_varlen_fa2", "packing_varlen_torch_fa2", "packing_varlen")
    assert hf_attention.kernels_of("packing_varlen_fa2").names == ("flash-attn-2",)
    assert hf_attention.kernels_of("packing_varlen_torch_fa2").names == ("torch.varlen_attn", "flash-attn-2")
    assert hf_attention.kernel_name({"softcap": 1.0}, implementation="packing_varlen_torch_fa2") == "flash-attn-2"
    assert hf_attention.kernel_name({}, implementation="packing_varlen_torch_fa2") == "torch.varlen_attn"
    assert (pa.implementation, pb.implementation, pc.implementation) == \
        ("packing_varlen_fa2", "packing_varlen_torch_fa2", "packing_varlen")
    # Each model's own implementation is checked and exact like packing_varlen (the CPU path).
    samples = docs()
    ref_logits = torch.cat(hf_each_alone(tiny(impl="eager"), samples)[0])
    for model, packed in ((a, pa), (b, pb)):
        with torch.no_grad():
            assert rel(model(**packed(samples)).logits[0, :sum(LENS)], ref_logits) <= TOL


@pytest.mark.parametrize("old", ["register", "HFPackedCollator", "hf_kwargs", "causal_lm_loss"])
def test_old_names_are_deprecated_wrappers(old):
    from packing.interop import hf, hf_loss

    model = tiny()
    batch = get_collator("concat")(docs())
    with pytest.warns(FutureWarning, match=rf"{old}.* is deprecated and will be removed in the next release: .*pack"):
        if old == "register":
            assert hf_attention.register() == "packing_varlen"
        elif old == "HFPackedCollator":
            kwargs = hf.HFPackedCollator(model)(docs())
            assert torch.equal(kwargs["cu_seq_lens_q"], pack(model)(docs())["cu_seq_lens_q"])
        elif old == "hf_kwargs":
            assert torch.equal(hf.hf_kwargs(batch, model)["labels"], pack(model).kwargs(batch)["labels"])
        else:
            kwargs = pack(model).kwargs(batch)
            assert rel(hf_loss.causal_lm_loss(model, kwargs), pack(model).loss(kwargs)) == 0


def test_the_object_checks_once_not_per_batch(monkeypatch):
    from packing.interop import hf

    model = tiny()
    packed = pack(model)
    calls = []
    monkeypatch.setattr(hf, "check_model", lambda *a, **k: calls.append(a) or "packing_varlen")
    for _ in range(3):
        packed(docs())
    assert calls == []
    assert isinstance(packed, HFPacking)


@torch.library.custom_op("varlen_packing_test::times_max_len", mutates_args=(), device_types="cpu")
def _times_max_len(x: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    return x * max_len


@_times_max_len.register_fake
def _(x, cu, max_len):
    return torch.empty_like(x)


def test_the_keys_check_keeps_dynamic_lengths_usable_by_a_compiled_kernel():
    # Compiled with dynamic lengths (they change between batches), the keys check must not leave the
    # kernel's custom op an unbound symbol: comparing max_length_k with max_length_q did, with `!=`
    # on a CPU (below) and with torch._check on an H100 (NameError inside the compiled FA4 step). So
    # compiled, max_length_k is not read (the kernel takes max_length_q, exact for the same
    # boundaries); keys' boundaries other than the queries' very tensor are still refused.
    def step(x, w, cu, max_q, max_k, cu_k=None):
        hf_attention.same_keys(cu, max_q, cu if cu_k is None else cu_k, max_k)
        return _times_max_len(x @ w, cu, max_q).sum()

    def unguarded(x, w, cu, max_q, max_k):  # the plain comparison: the negative control
        if max_q != max_k:
            raise ValueError("different")
        return _times_max_len(x @ w, cu, max_q).sum()

    w = torch.randn(4, 4)
    for fn, works in ((step, True), (unguarded, False)):
        compiled = torch.compile(fn, fullgraph=True)  # a graph break would hide it
        try:
            for n in (5, 7, 9, 11):
                x, cu = torch.randn(n, 4), torch.tensor([0, 2, n], dtype=torch.int32)
                torch.testing.assert_close(compiled(x, w, cu, n, n), fn(x, w, cu, n, n), rtol=1e-4, atol=1e-4)
        except NameError:
            assert not works, "the compiled step lost its length symbol"
        else:
            assert works, "the plain comparison no longer loses the symbol: the negative control proves nothing"
        torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with pytest.raises(Exception, match="got cu_seq_lens_k other than cu_seq_lens_q"):
        compiled(x, w, cu, 11, 11, cu.clone())
    with pytest.raises(ValueError, match=r"got max_length_k=12 and max_length_q=11"):
        step(x, w, cu, 11, 12)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_models_on_cuda_each_run_their_own_kernels():
    # Two models in one process, FA4 for one and torch's kernel for the other: each layer runs its
    # model's kernel (eager and compiled), and each is within bf16's error of its documents alone.
    from equivalence import assert_within, errors_against
    from packing.kernels import varlen_kernels

    skip_unless("fa4", "flash-attn-4" in varlen_kernels(), "flash-attn-4 does not load here")
    samples = [s.cuda() for s in docs()]
    ref_logits, ref_loss, ref_grads = hf_each_alone(tiny(impl="eager", dim=256).cuda(), samples)  # head dim 64
    for kernel in ("flash-attn-4", "torch.varlen_attn"):
        model = tiny(dim=256).cuda()
        packed = pack(model, kernels=[kernel])
        assert set(packed.layer_kernels().values()) == {kernel}
        for compiled in (False, True):
            step = torch.compile(model) if compiled else model
            batch = get_collator("concat", pad_to_multiple_of=32)([s.cpu() for s in samples]).to("cuda")
            hf_attention.last_kernel = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = step(**packed.kwargs(batch))
            out.loss.backward()
            assert hf_attention.last_kernel == kernel, (kernel, compiled)
            assert_within(errors_against(batch, out.logits, out.loss, model, ref_logits, ref_loss, ref_grads), 2e-2)
            model.zero_grad()
