import pytest
import torch

from models import ADAPTERS, adapter_for, adapters_for, collator_for, get_adapter
from models.attention import AttentionAdapter
from packing import LAYOUTS, get_collator

LENS = [1, 6, 13, 3]
H, D = 2, 8


def batch_for(layout):
    name = {"padded": "pad_longest", "packed": "concat", "nested": "nested"}[layout]
    options = {} if layout == "nested" else {"pad_to_multiple_of": 16}  # leave padding slots
    return get_collator(name, **options)([list(range(1, n + 1)) for n in LENS])


def dense_reference(q, k, v, batch, causal):
    """float64 attention over the whole token form with an explicit (slots x slots) mask that lets a
    real token see exactly the earlier (or all) tokens of its own sequence; obviously correct."""
    doc = torch.full((batch.num_slots,), -1)
    doc_ids = torch.arange(len(LENS)).repeat_interleave(torch.tensor(LENS))
    pos = torch.cat([torch.arange(n) for n in LENS])
    if batch.layout == "padded":
        L = q.shape[1]
        flat = (torch.arange(len(LENS))[:, None] * L + torch.arange(L)).flatten()[batch.attention_mask.flatten()]
        q, k, v = (t.reshape(-1, H, D) for t in (q, k, v))
    else:
        flat = torch.arange(batch.num_tokens)
    doc[flat] = doc_ids
    position = torch.zeros(batch.num_slots, dtype=torch.long)
    position[flat] = pos
    allowed = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    if causal:
        allowed &= position[None, :] <= position[:, None]
    qd, kd, vd = (t.double().transpose(0, 1) for t in (q, k, v))  # (H, S, D)
    scores = (qd @ kd.transpose(-1, -2) / D**0.5).masked_fill(~allowed, float("-inf"))
    out = torch.nan_to_num(scores.softmax(-1)) @ vd  # rows with nothing allowed are padding
    return out.transpose(0, 1), flat


PAIRS = [(layout, a) for layout in LAYOUTS for a in adapters_for(layout, "cpu")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("layout, attn", PAIRS, ids=[f"{l}-{a}" for l, a in PAIRS])
def test_adapter_matches_dense_float64_reference(layout, attn, causal):
    batch = batch_for(layout)
    shape = (*batch.unwrap(batch.input_ids).shape, H, D)
    q, k, v = (torch.randn(shape) for _ in range(3))
    adapter = get_adapter(attn, layout, "cpu")
    if adapter.unsupported(causal=causal, grad=False):  # a declared CPU limit raises, never runs
        with pytest.raises(ValueError, match=f"attention adapter '{attn}' on cpu: "):
            adapter(q, k, v, batch, causal=causal)
        return
    out = adapter(q, k, v, batch, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref, flat = dense_reference(q, k, v, batch, causal)
    got = out.reshape(-1, H, D)[flat].double()
    assert ((got - ref[flat]).norm() / ref[flat].norm()).item() < 1e-6  # fp32 against fp64


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("layout, attn", [p for p in PAIRS if p[0] != "nested"], ids=lambda x: str(x))
def test_poisoned_padding_never_reaches_real_outputs(layout, attn, causal):
    batch = batch_for(layout)
    shape = (*batch.unwrap(batch.input_ids).shape, H, D)
    q, k, v = (torch.randn(shape) for _ in range(3))
    clean = get_adapter(attn, layout, "cpu")(q, k, v, batch, causal=causal)
    real = batch.attention_mask if layout == "padded" else torch.arange(batch.num_slots) < batch.num_tokens
    # Adapters that read padding keys with weight 0 would leak NaN as 0 x NaN (declared by
    # reads_padding); they get huge finite garbage. The others get NaN, as in xFormers' tests.
    poison = 1e4 if ADAPTERS[attn].reads_padding else float("nan")
    for t in (q, k, v):
        t[~real] = poison
    out = get_adapter(attn, layout, "cpu")(q, k, v, batch, causal=causal)
    assert torch.isfinite(out[real]).all()
    assert torch.allclose(out[real], clean[real], rtol=1e-5, atol=1e-6)


def test_cpu_limits_raise_errors_that_say_what_to_do():
    nested = batch_for("nested")
    q = torch.randn(nested.num_tokens, H, D)
    with pytest.raises(ValueError, match=r"'sdpa_nested' on cpu: torch has no causal SDPA kernel for NestedTensors on CPU .*use attn='naive'"):
        get_adapter("sdpa_nested", "nested", "cpu")(q, q, q, nested, causal=True)
    packed = batch_for("packed")
    q = torch.randn(packed.num_slots, H, D, requires_grad=True)
    with pytest.raises(ValueError, match=r"'flex' on cpu: torch's FlexAttention has no backward on CPU; train with attn='naive'"):
        get_adapter("flex", "packed", "cpu")(q, q, q, packed, causal=True)
    with torch.no_grad():  # forward alone is fine
        x = q.detach()
        assert get_adapter("flex", "packed", "cpu")(x, x, x, packed, causal=True).shape == q.shape


def test_gpu_adapters_are_unavailable_on_cpu_with_a_clear_error():
    with pytest.raises(ValueError, match=r"'flash' is not available on cpu: it needs CUDA and a varlen kernel: "
                       r"flash-attn-4 \(Hopper\+\), flash-attn 2, or torch >= 2.10's varlen_attn; "
                       r"adapters for 'packed' there: flex, sdpa_docs, naive"):
        get_adapter("flash", "packed", "cpu")
    with pytest.raises(ValueError, match=r"'xformers' is not available on cpu: it needs CUDA and xFormers kernels "
                       r"that load: .*mslk-cuda \(torch 2.11\); adapters for 'packed' there: flex, sdpa_docs, naive"):
        get_adapter("xformers", "packed", "cpu")


def test_auto_picks_the_fastest_available():
    assert get_adapter("auto", "padded", "cpu").name == "sdpa"
    assert get_adapter("auto", "packed", "cpu").name == "sdpa_docs"  # issue 22: a real packed path on a CPU
    assert get_adapter("auto", "nested", "cpu").name == "sdpa_docs"
    assert "sdpa_docs" not in [get_adapter("auto", layout, "cuda").name for layout in ("packed", "nested")
                               if torch.cuda.is_available()]


def test_unknown_adapter_and_layout():
    with pytest.raises(ValueError, match=r"unknown attention adapter 'flashy'; known: auto, flash, xformers, sdpa_nested, sdpa, flex, sdpa_docs, naive"):
        get_adapter("flashy", "packed", "cpu")
    with pytest.raises(ValueError, match=r"unknown layout 'ragged'"):
        get_adapter("naive", "ragged", "cpu")


def test_adapter_unavailable_on_device_lists_alternatives(monkeypatch):
    class CudaOnly(AttentionAdapter):
        name = "cuda_only"
        layouts = frozenset({"packed"})
        devices = frozenset({"cuda"})
        needs = "CUDA"

    monkeypatch.setitem(ADAPTERS, "cuda_only", CudaOnly)
    with pytest.raises(ValueError, match=r"'cuda_only' is not available on cpu: it needs CUDA; adapters for 'packed' there: flex, sdpa_docs, naive"):
        get_adapter("cuda_only", "packed", "cpu")
    assert "cuda_only" in adapters_for("packed") and "cuda_only" not in adapters_for("packed", "cpu")


def test_flash_refuses_fp32_with_the_fix():
    from models.attention import FlashVarlenAttention, flash_backend

    if flash_backend() is None:  # torch < 2.10 without varlen_attn: nothing to construct
        pytest.skip("no varlen kernel importable in this torch")
    batch = batch_for("packed")
    q = torch.randn(batch.num_slots, H, D)
    with pytest.raises(ValueError, match=r"'flash' needs bf16 or fp16 q/k/v, got torch.float32; run the model under torch.autocast"):
        FlashVarlenAttention("cpu").attend(q, q, q, batch, causal=True)


def test_a_batch_with_an_xformers_mask_gets_the_adapter_that_consumes_it(monkeypatch):
    # Where both kernels run, auto gives a concat batch flash and an xformers batch xformers (its mask
    # would otherwise go unused). Availability is patched: the registry's choice is what is tested.
    from models.attention import FlashVarlenAttention, XformersAttention, auto_adapter

    monkeypatch.setattr(FlashVarlenAttention, "available", classmethod(lambda cls, d: True))
    monkeypatch.setattr(XformersAttention, "available", classmethod(lambda cls, d: True))
    assert auto_adapter("packed", "cpu") == "flash"
    assert auto_adapter("packed", "cpu", attn_bias=True) == "xformers"
    assert auto_adapter("padded", "cpu", attn_bias=True) == "sdpa"  # no consumer takes the layout


def test_without_a_consumer_the_mask_batch_falls_back_by_layout():
    from packing import get_collator

    batch = get_collator("xformers")([[5, 6, 7], [8, 9]])
    assert adapter_for(batch).name == "sdpa_docs"  # CPU: no xFormers kernels, the layout's choice


def test_collator_for_pairs_each_adapter_with_its_batches():
    from packing import COLLATORS

    for name, cls in ADAPTERS.items():
        collate = collator_for(name)
        assert COLLATORS[collate].layout in cls.layouts
    assert collator_for("xformers") == "xformers"
    with pytest.raises(ValueError, match=r"unknown attention adapter 'flashy'; known: flash"):
        collator_for("flashy")
