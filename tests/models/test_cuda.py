"""On a GPU: bf16 autocast through every collator x CUDA adapter matches the fp32 reference run on
each sequence alone, to 2e-2 relative, and batches pin and move without a sync. CPU machines skip
this module; run it on a GPU with `python -m pytest -m gpu`."""

import pytest
from kernels_required import required, skip_unless
import torch
from torch.utils.data import DataLoader

from equivalence import GPU_TOL as TOL
from equivalence import assert_compiles_once, assert_within, errors_against
from equivalence import collator as shared_collator
from equivalence import each_alone as fp32_each_alone
from equivalence import model_with as shared_model_with
from models import GPT, GPTConfig, adapters_for, lm_loss
from packing import COLLATORS, SyntheticDocs, get_collator
from packing.collate import block_diagonal_mask_class

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = GPTConfig(vocab_size=1024, max_len=1024, n_layers=4, dim=256, n_heads=4)


def _mask_class_loads() -> bool:
    try:
        block_diagonal_mask_class()
    except ImportError:  # neither xformers nor mslk on the path (the FlashAttention-4 setup leaves mslk out)
        return False
    return True


COLLATES = [c for c in COLLATORS if c != "xformers" or _mask_class_loads()]
PAIRS = [(c, a) for c in COLLATES for a in adapters_for(COLLATORS[c].layout, "cuda")]


def collator(name):
    return shared_collator(name, max_len=CONFIG.max_len)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    weights = GPT(CONFIG).state_dict()
    docs = SyntheticDocs(8, max_len=CONFIG.max_len, seed=1)
    samples = [docs[i] for i in range(len(docs))]
    refs = {causal: each_alone(weights, samples, causal) for causal in (True, False)}
    return weights, samples, refs


def each_alone(weights, samples, causal):
    return fp32_each_alone(weights, samples, causal, CONFIG, "cuda")


def model_with(attn, weights):
    return shared_model_with(attn, weights, CONFIG, "cuda")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("collate, attn", PAIRS, ids=[f"{c}-{a}" for c, a in PAIRS])
def test_bf16_matches_fp32_reference(collate, attn, causal, setup):
    weights, samples, refs = setup
    assert_bf16_matches(model_with(attn, weights), collate, samples, causal, refs[causal])


def assert_bf16_matches(model, collate, samples, causal, ref):
    """One bf16 autocast step of ``model`` on ``collate``'s batch of ``samples`` is within TOL of the
    fp32 each-document-alone reference ``ref`` (logits, loss, gradients)."""
    ref_logits, ref_loss, ref_grads = ref
    batch = collator(collate)(samples).pin_memory().to("cuda", non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(batch, causal=causal)
        loss = lm_loss(logits, batch)
    loss.backward()
    errors = errors_against(batch, logits, loss, model, ref_logits, ref_loss, ref_grads)
    worst = max(errors, key=errors.get)
    print(f"{collate} fuse={','.join(sorted(model.fuse)) or 'none'} causal={causal} "
          f"backend={model.adapter(batch.layout, 'cuda').backend}: worst {worst} {errors[worst]:.2e}, loss {errors['loss']:.2e}")
    assert errors[worst] <= TOL, worst


@pytest.mark.parametrize("collate, attn", PAIRS, ids=[f"{c}-{a}" for c, a in PAIRS])
def test_train_step_never_syncs_with_the_host(collate, attn, setup):
    # Host ints (max_seqlen, num_targets, seq_lens) exist so the step never waits on the GPU.
    weights, samples, _ = setup
    model = model_with(attn, weights)
    batches = [collator(collate)(samples[i : i + 4]).pin_memory() for i in (0, 4)]

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm_loss(model(batch, causal=True), batch).backward()

    step(batches[0].to("cuda", non_blocking=True))  # warm-up: compilation and lazy init may sync
    batch = batches[1].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", COLLATES)
def test_pin_memory_and_non_blocking_copy(name):
    docs = SyntheticDocs(4, max_len=64)
    batch = collator(name)([docs[i] for i in range(4)])
    pinned = batch.pin_memory()
    dense = [pinned.unwrap(t) for t in (pinned.input_ids, pinned.labels, pinned.position_ids)] + [pinned.cu_seqlens]
    assert all(t.is_pinned() for t in dense)
    moved = pinned.to("cuda", non_blocking=True)
    assert moved.input_ids.is_cuda and moved.cu_seqlens.is_cuda
    if moved.attn_bias is not None:
        assert moved.attn_bias.q_seqinfo.seqstart.is_cuda
    assert (moved.num_tokens, moved.max_seqlen, moved.num_targets) == (batch.num_tokens, batch.max_seqlen, batch.num_targets)
    assert [s.input_ids.tolist() for s in moved.split()] == [s.input_ids.tolist() for s in batch.split()]


@pytest.mark.parametrize("name", COLLATES)
def test_dataloader_pin_memory_with_workers(name):
    loader = DataLoader(SyntheticDocs(8, max_len=64, seed=2), batch_size=4, collate_fn=collator(name),
                        num_workers=2, pin_memory=True)
    for batch in loader:
        assert batch.unwrap(batch.input_ids).is_pinned()


def test_auto_on_cuda_prefers_the_kernels():
    from models import get_adapter

    assert get_adapter("auto", "padded", "cuda").name == "sdpa"
    assert get_adapter("auto", "nested", "cuda").name == "sdpa_nested"
    packed = get_adapter("auto", "packed", "cuda").name
    assert packed == adapters_for("packed", "cuda")[0] and packed in ("flash", "xformers")


def static_collator(samples, extra_tail):
    # A tail longer than max_len, so it is cut into several blocks: the case that needs care.
    total = get_collator("concat")(samples).num_tokens + extra_tail
    return get_collator("concat", total_tokens=total, max_seqs=16, max_seqlen=CONFIG.max_len)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_static_shapes_match_fp32_reference(causal, setup):
    # The whole padded row goes to the kernel with fixed-length boundaries; real tokens must not notice.
    weights, samples, refs = setup
    ref_logits, ref_loss, ref_grads = refs[causal]
    model = model_with("flash", weights)
    batch = static_collator(samples, 2 * CONFIG.max_len + 5)(samples).to("cuda")
    assert batch.static_cu_seqlens is not None and batch.num_slots - batch.num_tokens > CONFIG.max_len
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(batch, causal=causal)
        loss = lm_loss(logits, batch)
    loss.backward()
    assert torch.isfinite(logits).all()  # the padding tail's rows are computed too, and stay finite
    assert_within(errors_against(batch, logits, loss, model, ref_logits, ref_loss, ref_grads), TOL)


def test_static_shapes_compile_once(setup):
    # dynamic=False with static packs: batches with different document counts and longest documents
    # reuse the first compilation (a recompile raises here).
    # With FlashAttention-4 this runs its custom op (packing.kernels.flash4): as Python, its launcher broke
    # the graph and recompiled per document count (benchmarks/results/seed-workload/2026-11-22-h200-static).
    weights, samples, _ = setup
    model = torch.compile(model_with("flash", weights), dynamic=False)
    collate = static_collator(samples, 0)
    batches = [collate(samples[:k]).to("cuda") for k in (8, 3, 5, 1)]
    assert len({b.max_seqlen for b in batches}) > 1 and len({len(b.seq_lens) for b in batches}) == 4

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm_loss(model(batch, causal=True), batch).backward()

    assert_compiles_once(step, batches)


def test_fa4_custom_op_registrations():
    # Schema, fake (shape-only) implementation, autograd registration and AOT dispatch of the FA4
    # custom op, checked by torch itself; grouped-query heads and an empty sequence included.
    from packing.kernels.flash4 import _fwd, fa4_available

    skip_unless("fa4", fa4_available(), "FlashAttention-4 is not installed here, or the GPU is older than Hopper")
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(40, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k, v = (torch.randn(40, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True) for _ in "kv")
    cu = torch.tensor([0, 10, 30, 40, 40], dtype=torch.int32, device="cuda")
    torch.library.opcheck(_fwd, (q, k, v, cu, cu, 20, 20, True))
    # The chunk form: 16 queries attend the last 16 of 40 keys' two sequences, bottom-right causal.
    cu_q = torch.tensor([0, 6, 16], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 10, 40], dtype=torch.int32, device="cuda")
    torch.library.opcheck(_fwd, (q[:16].detach().requires_grad_(), k, v, cu_q, cu_k, 10, 30, True))


def _quack_loads(fusion: str = "norm") -> bool:
    from models.fusion import quack_available

    return quack_available(fusion)


def _refused_here(fuse: str) -> bool:
    """Where quack loads but its kernels for one of ``fuse`` are refused on this stack (mlp: quack
    0.6.5's GEMM epilogues with nvidia-cutlass-dsl 4.7.1 and 4.8.1), check the refusal: the model
    says so by name, not inside its first step."""
    from models.fusion import QUACK_FUSIONS, resolve_fuse

    refused = [name for name in fuse.split(",") if name in QUACK_FUSIONS and not _quack_loads(name)]
    if refused:
        with pytest.raises(ValueError, match=rf"the {refused[0]} fusion does not run here: .*leave {refused[0]} out of fuse"):
            resolve_fuse(fuse)
    return bool(refused)


# Each fusion alone and all together, on a padded and a packed layout (qkv: the flash adapter only).
FUSED = [("pad_max", "sdpa", "mlp"), ("pad_max", "sdpa", "norm"), ("concat", "flash", "mlp"),
         ("concat", "flash", "norm"), ("concat", "flash", "qkv"), ("concat", "flash", "mlp,norm,qkv")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("collate, attn, fuse", FUSED, ids=[f"{c}-{a}-{f}" for c, a, f in FUSED])
def test_fused_kernels_match_fp32_reference(collate, attn, fuse, causal, setup):
    if fuse != "qkv":
        skip_unless("quack", _quack_loads(), "quack-kernels is not installed here (pip install -e '.[hopper]'), "
                                             "or the GPU is older than Hopper")
        if _refused_here(fuse):
            return
    weights, samples, refs = setup
    assert_bf16_matches(shared_model_with(attn, weights, CONFIG, "cuda", fuse=fuse), collate, samples, causal, refs[causal])


def test_fused_kernels_compile_once(setup):
    # The quack GEMMs and norm and the packed attention op are custom ops: one graph, no recompiles.
    from models.fusion import available_fusions

    fuse = ",".join(sorted(available_fusions()))
    weights, samples, _ = setup
    model = torch.compile(shared_model_with("flash", weights, CONFIG, "cuda", fuse=fuse), dynamic=False)
    collate = static_collator(samples, 0)
    batches = [collate(samples[:k]).to("cuda") for k in (8, 3, 5)]

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm_loss(model(batch, causal=True), batch).backward()

    assert_compiles_once(step, batches)


def test_fused_eval_without_grad_matches_the_torch_path(setup):
    # Without autograd the fused MLP stores no pre-activation: a different code path in quack.
    skip_unless("quack", _quack_loads(), "quack-kernels is not installed here, or the GPU is older than Hopper")
    if _refused_here("mlp"):
        return
    weights, samples, _ = setup
    batch = collator("concat")(samples).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model_with("flash", weights)(batch, causal=False).float()
        fused = shared_model_with("flash", weights, CONFIG, "cuda", fuse="mlp,norm")(batch, causal=False).float()
    assert (fused - plain).norm() / plain.norm() < TOL


@pytest.mark.parametrize("name", ["flash-attn-4", "flash-attn-3"])
def test_packed_qkv_custom_op_registrations(name):
    # The packed forms' schemas, fakes and autograd, checked by torch, with an empty sequence.
    from packing.kernels import flash3, flash4

    available = flash4.fa4_available if name == "flash-attn-4" else flash3.fa3_available
    skip_unless("fa4" if name == "flash-attn-4" else "fa3", available(), f"{name} is not installed here, or the GPU does not take it")
    g = torch.Generator("cuda").manual_seed(0)
    qkv = torch.randn(40, 3, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    cu = torch.tensor([0, 10, 30, 40, 40], dtype=torch.int32, device="cuda")
    from models.packed_qkv import packed_kernel

    packed = packed_kernel(name)
    torch.library.opcheck(packed.op, (qkv, cu, 20, True))
    # And the same gradient as the three-tensor op.
    out = packed(qkv, cu, 20, True)
    (dqkv,) = torch.autograd.grad(out.float().square().sum(), qkv)
    q, k, v = qkv.detach().unbind(1)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    plain = (flash4.fa4_varlen(q, k, v, cu, 20, True) if name == "flash-attn-4" else flash3.fa3_varlen(q, k, v, cu, 20, True))
    grads = torch.autograd.grad(plain.float().square().sum(), (q, k, v))
    assert torch.allclose(out, plain) and torch.allclose(dqkv, torch.stack(grads, 1))


def test_every_required_kernel_loads():
    """REQUIRE_KERNELS names kernels a device run must have; a test that does not see its kernel
    (an adapter absent from PAIRS, a skipped fusion) would otherwise pass without running it."""
    from models.fusion import quack_available
    from models.kernels import fmha_backend
    from packing.kernels import varlen_kernels

    varlen = varlen_kernels()
    fmha = (fmha_backend() or ("none",))[0]
    loads = {"fa3": "flash-attn-3" in varlen, "fa4": "flash-attn-4" in varlen, "fa2": "flash-attn-2" in varlen,
             "quack": quack_available(), "mslk": fmha == "mslk", "xformers": fmha == "xformers"}
    missing = sorted(k for k in required() if not loads[k])
    assert not missing, f"REQUIRE_KERNELS has {missing}, which do not load here (loaded: {sorted(varlen)}, fmha {fmha})"
