"""On a GPU: the varlen kernels a context-parallel shard runs its chunks with. Each one that loads
passes its first-use check (:func:`packing.context.varlen.check_kernel`: a document cut across two
ranks, grouped-query heads, forward and backward against the softmax written out in fp64, with and
without a window, softcap and scale), and on a row cut over 4 ranks the chunks' bf16 outputs and
gradients are as close to fp64 each-document-alone as the same kernel on the unsharded row. CPU
machines skip this module; run it with `python -m pytest -m gpu` (REQUIRE_KERNELS=fa3,fa4,fa2 to
fail where one of those does not load)."""

import pytest
from kernels_required import skip_unless
import torch

from benchmarks.cp import document_attention
from packing import get_collator
from packing.context import batch_blocks, plan_layout, shard, unshard
from packing.context.attention import attend_chunks, simulated_keys
from packing.context.shard import local_index
from packing.context.varlen import check_kernel
from packing.kernels import chunk_varlen_kernels, takes_head_dim, varlen_options

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# kernel -> its REQUIRE_KERNELS name; torch's own kernel ships with torch >= 2.11 and must load on CUDA
KERNELS = {"flash-attn-3": "fa3", "flash-attn-4": "fa4", "flash-attn-2": "fa2", "torch.varlen_attn": None}


def _kernel(name: str):
    found = chunk_varlen_kernels()
    if KERNELS[name] is None:
        assert name in found, f"{name} does not load on this GPU with torch {torch.__version__}"
    else:
        skip_unless(KERNELS[name], name in found, f"{name} is not installed here, or the GPU does not run it")
    return found[name]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("name", list(KERNELS))
def test_every_chunk_kernel_passes_its_first_use_check(name, head_dim):
    kernel = _kernel(name)
    if not takes_head_dim(name, head_dim):
        pytest.skip(f"{name} does not compute head dim {head_dim}")
    computes = varlen_options(name)
    option_sets = [frozenset()] + [frozenset({o}) for o in sorted(computes)] + [frozenset(computes)]
    for options in dict.fromkeys(option_sets):
        # fp16 once, bf16 with every option: each new variant of a JIT-compiled kernel (FA4's CuTe
        # DSL) compiles at first use, tens of seconds each
        for dtype in (torch.bfloat16,) if options else (torch.bfloat16, torch.float16):
            error = check_kernel(name, kernel, torch.device("cuda"), dtype, head_dim, options)
            assert 0 < error < 2e-2, (name, head_dim, sorted(options), dtype, error)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("spread", ["all", "fewest"])
def test_a_row_cut_over_4_ranks_is_as_close_to_fp64_as_the_unsharded_row(name, spread):
    kernel = _kernel(name)
    # three documents cut, in 8 chunks each ("fewest": the 1500 in 6 over 3 ranks, the 700 in 4 over 2), the rest whole
    lens = [1500, 3, 1, 700, 64, 2000, 17, 6, 300, 1]
    batch = get_collator("concat")([[0] * n for n in lens])
    T, D = batch.num_slots, 128
    g = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (8, 2, 2, 8))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = document_attention(*leaves, lens, causal=True)[0]
    want.backward(d_out)
    reference = [want.detach()] + [t.grad for t in leaves]

    def errors(world: int) -> list[float]:
        layout = plan_layout(batch_blocks(batch), world, spread=spread)
        if world > 1:
            assert sum(c.split for rank in layout.chunks for c in rank) == (18 if spread == "fewest" else 24)
        q16, k16, v16 = (t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
        outs = []
        for r in range(world):
            part = shard(batch, layout, r).to("cuda")
            idx = local_index(layout, r).to("cuda")
            outs.append(attend_chunks(q16[idx], k16[idx], v16[idx], simulated_keys(k16, v16, part.context), part,
                                      causal=True, kernel=kernel)[None])
        out = unshard(outs, layout)[0]
        out.backward(d_out.to("cuda", torch.bfloat16))
        got = [out.detach(), q16.grad, k16.grad, v16.grad]
        return [((a.double().cpu() - b).norm() / b.norm()).item() for a, b in zip(got, reference)]

    whole, cut = errors(1), errors(4)
    for what, w, c in zip(("out", "dq", "dk", "dv"), whole, cut):
        assert c <= 2 * w and c < 2e-2, f"{name} {what}: cut over 4 ranks {c:.2e}, unsharded {w:.2e}"
