"""The core promise: every collator x adapter gives the same logits, loss and gradients as running
each sequence alone, to 1e-5 relative in fp32 on CPU (observed: about 3e-7)."""

import pytest
from property import given, settings, st
import torch
import torch.nn.functional as F

from equivalence import CPU_CONFIG, CPU_TOL, each_alone, model_with, random_docs, rel
from equivalence import collator as shared_collator
from models import GPT, PRESETS, GPTConfig, adapters_for, lm_loss
from packing import COLLATORS, get_collator

CONFIG, TOL = CPU_CONFIG, CPU_TOL  # relative, fp32: ‖got - ref‖ / ‖ref‖
LENS = [1, 9, 40, 4, 17]  # a length-1 document and one longer than pad_longest's x32 rounding
PAIRS = [(c, a) for c in COLLATORS for a in adapters_for(COLLATORS[c].layout, "cpu")]


def collator(name, **options):
    # pad_longest rounds to 32; the packed collators get a padding tail that must stay invisible
    return shared_collator(name, **{"pad_to_multiple_of": 32, **options})


def docs(lens, seed=0):
    return random_docs(lens, seed=seed)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("collate, attn", PAIRS, ids=[f"{c}-{a}" for c, a in PAIRS])
def test_batch_equals_each_sequence_alone(collate, attn, causal, weights):
    samples = docs(LENS)
    ref_logits, ref_loss, ref_grads = each_alone(weights, samples, causal)
    model = model_with(attn, weights)
    batch = collator(collate)(samples)
    adapter = model.adapter(batch.layout, "cpu")
    if adapter.unsupported(causal=causal, grad=False):
        with pytest.raises(ValueError, match=f"attention adapter '{attn}' on cpu: "):
            model(batch, causal=causal)
        return
    train = adapter.unsupported(causal=causal, grad=True) is None  # flex on CPU: forward only
    with torch.set_grad_enabled(train):
        logits = model(batch, causal=causal)
        loss = lm_loss(logits, batch)
    for i, (got, ref) in enumerate(zip(batch.per_sequence(logits), ref_logits)):
        assert rel(got.detach(), ref) <= TOL, f"logits of document {i}"
    assert rel(loss.detach(), ref_loss) <= TOL
    if not train:
        with pytest.raises(ValueError, match=f"attention adapter '{attn}' on cpu: .*no backward"):
            model(batch, causal=causal)
        return
    loss.backward()
    for name, p in model.named_parameters():
        assert rel(p.grad, ref_grads[name]) <= TOL, f"gradient of {name}"


@pytest.mark.parametrize("collate, attn", PAIRS, ids=[f"{c}-{a}" for c, a in PAIRS])
def test_padding_content_never_changes_real_logits(collate, attn, weights):
    # Invariant: what sits in padding slots (here the pad id) is invisible to real tokens.
    model = model_with(attn, weights)
    samples = docs(LENS)
    a = collator(collate, pad_id=0)(samples)
    b = collator(collate, pad_id=CONFIG.vocab_size - 1)(samples)
    causal = model.adapter(a.layout, "cpu").unsupported(causal=True, grad=False) is None
    with torch.no_grad():
        for x, y in zip(a.per_sequence(model(a, causal=causal)), b.per_sequence(model(b, causal=causal))):
            assert rel(x, y) <= TOL


# Invariant: for any document lengths, every collator's logits agree with pad_longest + sdpa.
@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(1, 24), min_size=1, max_size=6), causal=st.booleans())
def test_any_lengths_every_collate_agrees(lens, causal, weights):
    samples = docs(lens, seed=len(lens))
    ref_batch = collator("pad_longest", pad_to_multiple_of=None)(samples)
    ref = ref_batch.per_sequence(model_with("sdpa", weights)(ref_batch, causal=causal))
    naive = model_with("naive", weights)
    for name in COLLATORS:
        batch = collator(name)(samples)
        for got, want in zip(batch.per_sequence(naive(batch, causal=causal)), ref):
            assert rel(got.detach(), want.detach()) <= TOL, name


@pytest.mark.parametrize("name", list(COLLATORS))
def test_logits_come_back_in_the_batch_layout(name, weights):
    batch = collator(name)(docs([3, 5]))
    logits = model_with("naive", weights)(batch)
    if batch.layout == "nested":
        assert logits.is_nested and logits.offsets() is batch.input_ids.offsets()
    else:
        assert logits.shape == (*batch.input_ids.shape, CONFIG.vocab_size)


def test_token_ids_beyond_vocab_are_rejected_at_the_model(weights):
    batch = get_collator("concat")([[1, 2, 150]])
    with pytest.raises(ValueError, match=r"token id 150 >= vocab_size 97; use a tokenizer that fits"):
        model_with("naive", weights)(batch)


def test_sequence_beyond_max_len_is_rejected_at_the_model(weights):
    batch = get_collator("concat")([torch.ones(65, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"sequence of length 65 > max_len 64; split long documents"):
        model_with("naive", weights)(batch)


def test_model_takes_only_a_batch(weights):
    with pytest.raises(TypeError, match=r"GPT takes a packing.Batch, got dict"):
        model_with("naive", weights)({"input_ids": torch.ones(1, 3)})


def test_layout_the_adapter_cannot_take(weights):
    batch = get_collator("nested")([[1, 2]])
    with pytest.raises(ValueError, match=r"'sdpa' takes layouts \['padded'\], not 'nested'; adapters that take 'nested': sdpa_nested, sdpa_docs, naive"):
        model_with("sdpa", weights)(batch)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"dim 30 is not divisible by n_heads 4"):
        GPTConfig(dim=30, n_heads=4)


def test_loss_is_mean_over_real_targets_only(weights):
    model = model_with("sdpa", weights)
    batch = get_collator("pad_max", max_len=64)([[5, 6, 7], [8, 9]])  # 3 targets, 125 padded slots
    logits = model(batch)
    by_hand = torch.cat([F.cross_entropy(x, y, reduction="none")[:-1] for x, y in
                         zip(batch.per_sequence(logits), batch.per_sequence(batch.labels))]).mean()
    assert batch.num_targets == 3
    assert rel(lm_loss(logits, batch), by_hand) <= TOL


def test_batch_without_targets_warns_alone_and_adds_nothing_in_a_step(weights):
    import warnings

    model = model_with("naive", weights)
    batch = get_collator("concat")([[5], [6]])  # length-1 documents predict nothing
    # Alone, a step on it trains nothing: it says so (it used to be a silent 0.0).
    with pytest.warns(UserWarning, match=r"no target tokens to average over \(normalizer 0\): all 2 documents of this "
                                         r"batch are one token long.*drop documents shorter than 2 tokens"):
        loss = lm_loss(model(batch), batch)
    loss.backward()
    assert loss.item() == 0.0 and all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())
    # One micro-batch of a step whose other micro-batches have targets: it adds 0, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lm_loss(model(batch), batch, normalizer=5).item() == 0.0


@pytest.mark.parametrize("collate, attn", [("concat", "naive"), ("pad_longest", "sdpa")])
def test_compiled_model_matches_each_sequence_alone(collate, attn, weights):
    # The compiled path keeps the promise: same logits, loss and gradients as each document alone.
    import torch._dynamo

    torch._dynamo.reset()
    samples = docs([3, 9, 17])
    ref_logits, ref_loss, ref_grads = each_alone(weights, samples, causal=True)
    model = model_with(attn, weights)
    compiled = torch.compile(model)
    batch = collator(collate)(samples)
    logits = compiled(batch, causal=True)
    loss = lm_loss(logits, batch)
    loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    for got, ref in zip(batch.per_sequence(logits), ref_logits):
        assert rel(got.detach(), ref) <= TOL
    assert rel(loss.detach(), ref_loss) <= TOL
    for name, p in model.named_parameters():
        assert rel(p.grad, ref_grads[name]) <= TOL, name


def test_compiled_forward_leaves_the_check_to_the_caller():
    # Traced, the check's host ints would be guards that recompile per batch; the caller runs it.
    model = GPT(PRESETS["tiny"], attn="naive")
    bad = get_collator("concat")([[5, 6, 2000]])
    with pytest.raises(ValueError, match=r"batch holds token id 2000 >= vocab_size 1024"):
        model(bad)
    with pytest.raises(ValueError, match=r"batch holds token id 2000 >= vocab_size 1024"):
        torch.compile(model, backend="eager").check(bad)
