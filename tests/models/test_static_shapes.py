"""Static shapes through the ``flash`` adapter's own logic, on a CPU.

The varlen kernel is replaced by an fp32 reference that takes the same arguments (q, k, v,
cu_seqlens, max_seqlen, causal) and masks by the boundaries alone, so what is tested here is what the
adapter hands the kernel: the whole padded row, ``static_cu_seqlens`` with its padding-tail blocks and
empty sequences, and the constant ``static_max_seqlen``. The real kernels run the same checks in
``tests/models/test_cuda.py`` on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from models import lm_loss
from models.attention import FlashVarlenAttention
from packing import get_collator

from equivalence import CPU_CONFIG as CONFIG
from equivalence import CPU_TOL as TOL
from equivalence import assert_compiles_once, assert_within, each_alone, errors_against, model_with
from equivalence import random_docs as docs


def reference_varlen(q, k, v, cu_seqlens, max_seqlen, causal):
    """(T, H, D) attention within the blocks that ``cu_seqlens`` marks; reads no host value from it."""
    T = q.shape[0]
    block = torch.searchsorted(cu_seqlens, torch.arange(T, dtype=cu_seqlens.dtype), right=True)  # (T,)
    mask = block[:, None] == block[None, :]
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask)
    return out.transpose(0, 1)


def flash_on_cpu(weights):
    model = model_with("naive", weights)
    adapter = FlashVarlenAttention("cpu", kernel=("reference", reference_varlen), kernel_dtypes=(torch.float32,))
    model._adapters[("packed", "cpu", False, False)] = adapter  # what model.adapter() resolves for concat batches
    return model


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_static_row_equals_each_sequence_alone(causal, weights):
    # LENS total 71 tokens; a 200-slot row leaves a 129-slot tail, cut into blocks of <= 64 slots.
    samples = docs([1, 9, 40, 4, 17])
    ref_logits, ref_loss, ref_grads = each_alone(weights, samples, causal)
    batch = get_collator("concat", total_tokens=200, max_seqs=8, max_seqlen=CONFIG.max_len)(samples)
    assert batch.static_cu_seqlens.tolist() == [0, 1, 10, 50, 54, 71, 135, 199, 200, 200, 200, 200, 200]
    model = flash_on_cpu(weights)
    logits = model(batch, causal=causal)
    loss = lm_loss(logits, batch)
    loss.backward()
    assert torch.isfinite(logits).all()
    assert_within(errors_against(batch, logits, loss, model, ref_logits, ref_loss, ref_grads), TOL)


def test_static_batches_compile_once(weights):
    # dynamic=False: batches with other document counts, lengths and longest documents must reuse the
    # first compilation.
    model = torch.compile(flash_on_cpu(weights), dynamic=False, backend="aot_eager")
    collate = get_collator("concat", total_tokens=128, max_seqs=8, max_seqlen=CONFIG.max_len)
    batches = [collate(docs(lens, seed=i)) for i, lens in enumerate([[5, 60, 3], [64, 64], [1], [7, 7, 7, 7, 7, 7, 7, 7]])]
    assert len({b.max_seqlen for b in batches}) == 4 and len({len(b.seq_lens) for b in batches}) == 4

    def step(batch):
        lm_loss(model(batch), batch).backward()

    assert_compiles_once(step, batches)


def test_flash_refuses_fp32_with_the_fix():
    batch = get_collator("concat")([[1, 2, 3]])
    q = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match=r"attention adapter 'flash' needs bf16 or fp16 q/k/v, got torch.float32; "
                                         r"run the model under torch.autocast"):
        FlashVarlenAttention("cpu", kernel=("reference", reference_varlen)).attend(q, q, q, batch, causal=True)


def test_flash_takes_the_first_kernel_that_computes_the_head_dimension(monkeypatch):
    # An FA3 build with only head dimension 128 first in line: a head-dimension-64 model runs the
    # next kernel, named in backend; a head dimension no kernel takes is a ValueError up front.
    import models.attention.flash as flash

    calls = []

    def kernel(name):
        def run(q, k, v, cu_seqlens, max_seqlen, causal):
            calls.append(name)
            return reference_varlen(q, k, v, cu_seqlens, max_seqlen, causal)
        return run

    monkeypatch.setattr(flash, "varlen_kernels", lambda: {"flash-attn-3": kernel("flash-attn-3"),
                                                          "torch.varlen_attn": kernel("torch.varlen_attn")})
    monkeypatch.setattr(flash, "packed_kernel", lambda name: None)
    takes = {"flash-attn-3": lambda d: d == 128, "torch.varlen_attn": lambda d: d % 8 == 0}
    import packing.kernels

    monkeypatch.setattr(packing.kernels, "head_dim_check", lambda name: takes[name])
    adapter = FlashVarlenAttention("cpu", kernel_dtypes=(torch.float32,))
    assert adapter.backend == "flash-attn-3"  # before a head dimension is bound: the first that loads
    adapter.bind_head_dim(64)
    assert adapter.backend == "torch.varlen_attn"
    batch = get_collator("concat")(docs([5, 3]))
    for head_dim, ran in ((64, "torch.varlen_attn"), (128, "flash-attn-3")):
        q = torch.randn(batch.num_tokens, 2, head_dim)
        out = adapter.attend(q, q, q, batch, causal=True)
        assert calls[-1] == ran and out.shape == q.shape
    with pytest.raises(ValueError, match=r"attention adapter 'flash': no varlen kernel here computes head dimension "
                                         r"12; kernels here and their options: flash-attn-3: .* \(not at head dimension "
                                         r"12\), torch.varlen_attn: .* \(not at head dimension 12\); torch's kernel "
                                         r"takes multiples of 8 up to 256"):
        adapter.bind_head_dim(12)
    monkeypatch.setattr(flash, "varlen_kernels", lambda: {})
    with pytest.raises(ValueError, match=r"attention adapter 'flash' needs CUDA and a varlen kernel: .*; none loads here"):
        FlashVarlenAttention("cpu")
