"""Context parallelism: the layout, the shards, and training across gloo ranks against one process."""

import os
from dataclasses import replace
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import GPT, GPTConfig, lm_loss
from models.attention.naive import NaiveAttention
from packing import get_collator
from packing.context import ContextCollator, ContextShard, batch_blocks, context_attention, plan_layout, shard, unshard
from packing.context.layout import AREA_COST, TOKEN_COST

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds: a hung collective fails the test instead of stalling CI
TOL = 1e-5


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def work(tokens, first, last):  # a contiguous piece of a causal document, positions first..last (1-based)
    return TOKEN_COST * tokens + AREA_COST * (first + last) * tokens / 2


@pytest.mark.parametrize("world", [2, 4, 8])
def test_one_long_document_is_balanced_where_a_contiguous_split_is_not(world):
    n = 131_072
    layout = plan_layout([n], world)
    balance = max(layout.work()) / statistics.mean(layout.work())
    step = n // world
    contiguous = [work(step, r * step + 1, (r + 1) * step) for r in range(world)]
    assert balance <= 1.001
    assert max(contiguous) / statistics.mean(contiguous) > 1.4  # 1.5 / 1.75 / 1.875 in attention alone
    assert all(len(rank) == 2 and all(c.split for c in rank) for rank in layout.chunks)  # head and tail


@pytest.mark.parametrize("spread", ["all", "fewest"])
def test_a_long_tailed_mix_keeps_short_documents_whole_and_balanced(spread):
    g = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < 131_072:
        lens.append(min(int(torch.empty(1).log_normal_(7.5, 1.4, generator=g).item()) + 1, 131_072 - sum(lens)))
    for world in (2, 4, 8):
        layout = plan_layout(lens, world, spread=spread)
        assert max(layout.work()) / statistics.mean(layout.work()) <= 1.05, world
        cut = {c.block for rank in layout.chunks for c in rank if c.split}
        assert len(cut) < len(lens) / 4  # most documents stay whole: no padding to 2N, no gathered keys
        held = sorted((c.start, c.end) for rank in layout.chunks for c in rank)
        assert [a for a, _ in held] == [0, *[b for _, b in held[:-1]]] and held[-1][1] == sum(lens)  # each token once
        chunks = [c.length for rank in layout.chunks for c in rank if c.split]
        if spread == "fewest" and world == 8:  # each cut document over the fewest ranks: chunks 4x longer here
            assert min(chunks) >= 4 * min(c.length for rank in plan_layout(lens, world).chunks for c in rank if c.split)


@pytest.mark.parametrize("spread", ["all", "fewest"])
@pytest.mark.parametrize("world", [2, 4, 8])
def test_aligned_cuts_fall_on_the_kernels_tile_edges_and_stay_balanced(spread, world):
    # align=128: every cut chunk of a document long enough starts a multiple of 128 tokens after its
    # document's start (the last chunk ends with the document); shorter cut documents are cut as
    # without alignment. The mix stays within the balance bound, and the row's tokens are each held once.
    g = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < 131_072:
        lens.append(min(int(torch.empty(1).log_normal_(7.5, 1.4, generator=g).item()) + 1, 131_072 - sum(lens)))
    lens[3:3] = [2 * world * 128 - 1, 3 * world]  # cut, but too short for chunks of 128 tokens
    aligned, plain = (plan_layout(lens, world, spread=spread, split_tokens=2 * world, align=a) for a in (128, 1))
    assert max(aligned.work()) / statistics.mean(aligned.work()) <= 1.05
    held = sorted((c.start, c.end) for rank in aligned.chunks for c in rank)
    assert [a for a, _ in held] == [0, *[b for _, b in held[:-1]]] and held[-1][1] == sum(lens)
    by_block = {}
    for rank in aligned.chunks:
        for c in rank:
            if c.split:
                by_block.setdefault(c.block, []).append(c)
    edges_of = {b: sorted(c.start for c in chunks) for b, chunks in by_block.items()}
    plain_edges = {c.block: [] for rank in plain.chunks for c in rank if c.split}
    for rank in plain.chunks:
        for c in rank:
            if c.split:
                plain_edges[c.block].append(c.start)
    long_enough = [b for b, chunks in by_block.items() if all(c.length >= 128 for c in chunks)]
    assert len(long_enough) >= 2
    for b, chunks in by_block.items():
        start = chunks[0].block_start
        if chunks[0].block_end - start >= len(chunks) * 128:  # every chunk on a tile edge, and no tile-less chunk
            assert all((e - start) % 128 == 0 for e in edges_of[b]) and min(c.length for c in chunks) >= 64, b
        else:  # too short for tiles: the same cuts as without alignment
            assert edges_of[b] == sorted(plain_edges[b]), b
    assert {b for b in by_block if edges_of[b] != sorted(plain_edges[b])}  # alignment moved some cuts
    assert [(c.start, c.end) for rank in plan_layout([1000], 2, align=128).chunks for c in rank] == \
        [(0, 256), (768, 1000), (256, 512), (512, 768)]  # nearest multiples of 128 to 250, 500, 750


@pytest.mark.parametrize("dim", [128, 1024, 4096])
def test_the_layout_balances_by_the_cost_of_the_models_width(dim):
    # A narrow model's attention weighs more against its per-token layers: area_cost = 1/(6·dim).
    g = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < 131_072:
        lens.append(min(int(torch.empty(1).log_normal_(7.5, 1.4, generator=g).item()) + 1, 131_072 - sum(lens)))
    for world in (2, 4, 8):
        layout = plan_layout(lens, world, area_cost=1 / (6 * dim))
        by_hand = [sum(TOKEN_COST * c.length + c.area() / (6 * dim) for c in rank) for rank in layout.chunks]
        assert layout.work() == pytest.approx(by_hand, rel=1e-12)
        assert max(by_hand) / statistics.mean(by_hand) <= 1.05, (dim, world)
    assert plan_layout(lens, 8, area_cost=1 / 768) != plan_layout(lens, 8)  # the width changes the plan


def test_the_layout_is_a_pure_function_of_the_row_and_the_ranks():
    lens = [300, 5, 77, 1, 40, 2000, 9]
    assert plan_layout(lens, 4) == plan_layout(list(lens), 4)
    assert plan_layout(lens, 4) != plan_layout(lens, 3)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_unshard_of_shard_is_the_row_bitwise(world):
    g = torch.Generator().manual_seed(world)
    docs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (41, 3, 17, 1, 29)]
    batch = get_collator("concat", pad_to_multiple_of=16)(docs)
    layout = plan_layout(batch_blocks(batch), world, split_tokens=10)
    parts = [shard(batch, layout, r) for r in range(world)]
    for name in ("input_ids", "labels", "position_ids"):
        assert torch.equal(unshard([getattr(p, name) for p in parts], layout), getattr(batch, name)), name
    assert all(p.context.num_targets == batch.num_targets for p in parts)
    assert sum(p.num_targets for p in parts) == batch.num_targets  # targets set on the whole row, none lost
    assert all(p.to("cpu").context.key_index[True].dtype == torch.int64 for p in parts)


def test_one_rank_attends_as_the_whole_row():
    # world size 1, no process group: the context attention is the row's per-document attention.
    g = torch.Generator().manual_seed(0)
    batch = get_collator("concat")([torch.randint(0, 50, (n,), generator=g).tolist() for n in (9, 4, 13)])
    part = shard(batch, plan_layout(batch_blocks(batch), 1), 0)
    q = torch.randn(batch.num_slots, 4, 8, generator=g)
    k, v = (torch.randn(batch.num_slots, 2, 8, generator=g) for _ in "kv")
    for causal in (True, False):
        ref = NaiveAttention("cpu")(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), batch, causal=causal)
        assert rel(context_attention(q, k, v, part, causal=causal), ref) <= TOL


def test_regather_keeps_less_for_the_backward_and_gives_the_same_gradients():
    # Bytes saved for the backward, counted by autograd's saved-tensor hooks: with regather only the
    # attention's own q, k and v are kept (and the backward recomputes the rest), bitwise the same.
    g = torch.Generator().manual_seed(0)
    batch = get_collator("concat")([torch.randint(0, 50, (n,), generator=g).tolist() for n in (40, 3, 17)])
    q, k, v = (torch.randn(batch.num_slots, h, 8, generator=g) for h in (4, 2, 2))
    results = {}
    for regather in (False, True):
        part = shard(batch, plan_layout(batch_blocks(batch), 1), 0, regather=regather)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        saved = []

        def keep(t):
            saved.append(t.untyped_storage().nbytes() if t.layout == torch.strided else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = context_attention(*leaves, part, causal=True)
        out.square().sum().backward()
        results[regather] = (sum(saved), out.detach(), [t.grad for t in leaves])
    assert results[True][0] < results[False][0] / 2
    assert torch.equal(results[True][1], results[False][1])
    assert all(torch.equal(a, b) for a, b in zip(results[True][2], results[False][2]))
    with pytest.raises(TypeError, match=r"regather is 1; expected True or False"):
        shard(batch, plan_layout(batch_blocks(batch), 1), 0, regather=1)


def test_a_compiled_model_compiles_shards_of_new_rows_no_more_after_the_second():
    # The attention runs eagerly (its chunks are host ints); the layers around it see the shard's
    # token count, which turns dynamic at the second row: no compilation after that, same losses.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from packing.context import ContextCollator

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, max_len=256, n_layers=2, dim=32, n_heads=4))
    compiled = torch.compile(model, backend="aot_eager")
    collate = ContextCollator(get_collator("concat"), world_size=1, rank=0)
    g = torch.Generator().manual_seed(0)
    graphs = []
    for lens in ([50, 3, 9], [70, 1], [20, 20, 20, 5], [33], [100, 2, 2, 2, 2]):
        part = collate([torch.randint(0, 97, (n,), generator=g).tolist() for n in lens])
        loss = lm_loss(compiled(part), part, normalizer=part.context.num_targets)
        eager = lm_loss(model(part), part, normalizer=part.context.num_targets)
        assert rel(loss.detach(), eager.detach()) <= TOL
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], graphs


def test_bad_inputs_are_refused_by_name():
    batch = get_collator("concat")([[1, 2, 3], [4, 5]])
    layout = plan_layout(batch_blocks(batch), 2)
    with pytest.raises(ValueError, match=r"world_size is 0; expected an int >= 1"):
        plan_layout([3], 0)
    for bad in (-1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match=rf"area_cost is {bad!r}; expected a finite number >= 0 .*1/\(6·d\)"):
            plan_layout([3], 2, area_cost=bad)
    with pytest.raises(ValueError, match=r"block_lens is \[3, 0\]; expected one or more blocks of >= 1 token"):
        plan_layout([3, 0], 2)
    with pytest.raises(ValueError, match=r"spread is 'some'; expected 'all' \(a cut block over every rank\) or 'fewest'"):
        plan_layout([3], 2, spread="some")
    with pytest.raises(ValueError, match=r"spread is 'every'; expected 'all'"):
        ContextCollator(get_collator("concat"), world_size=2, rank=0, spread="every")
    for bad in (0, -128, True, 1.5, "128"):
        with pytest.raises(ValueError, match=rf"align is {bad!r}; expected an int >= 1 \(.*128 for FlashAttention's tiles, 1 for none\)"):
            plan_layout([3], 2, align=bad)
    with pytest.raises(ValueError, match=r"align is 0; expected an int >= 1"):
        ContextCollator(get_collator("concat"), world_size=2, rank=0, align=0)
    with pytest.raises(ValueError, match=r"context parallelism cuts one packed row; got a 'padded' batch"):
        shard(get_collator("pad_max", max_len=8)([[1, 2, 3]]), layout, 0)
    static = get_collator("concat", total_tokens=8, max_seqs=4, max_seqlen=4)([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"does not carry Batch.static_cu_seqlens to the shards yet"):
        shard(static, plan_layout(batch_blocks(static), 2), 0)
    with pytest.raises(ValueError, match=r"the layout is for blocks \[3, 2\], the batch has \[4, 1\]"):
        shard(get_collator("concat")([[1, 2, 3, 4], [5]]), layout, 0)
    with pytest.raises(ValueError, match=r"rank is 2; the layout has ranks 0 to 1"):
        shard(batch, layout, 2)
    with pytest.raises(ValueError, match=r"rank 1 holds no tokens of this row \(1 tokens over 2 ranks\)"):
        one = get_collator("concat")([[1]])
        shard(one, plan_layout(batch_blocks(one), 2), 1)
    wide = get_collator("concat")([[1] * 8, [2, 3]])
    planned = plan_layout(batch_blocks(wide), 2)
    swapped = replace(planned, chunks=(planned.chunks[0][::-1], planned.chunks[1]))  # the whole block first
    with pytest.raises(ValueError, match=r"rank 0's chunks put a whole block before a cut one; a layout lists each "
                                         r"rank's cut chunks first .*use plan_layout"):
        shard(wide, swapped, 0)
    part = shard(batch, layout, 0)
    with pytest.raises(ValueError, match=r"already a context-parallel shard"):
        shard(part, layout, 0)
    with pytest.raises(ValueError, match=r"the shard is rank 0 of 2, and this process is rank 0 of a context-parallel "
                                         r"group of 1"):
        context_attention(torch.zeros(part.num_slots, 1, 4), torch.zeros(part.num_slots, 1, 4),
                          torch.zeros(part.num_slots, 1, 4), part, causal=True)
    with pytest.raises(ValueError, match=r"attention adapter 'naive' cannot attend a context-parallel shard"):
        NaiveAttention("cpu")(*(torch.zeros(part.num_slots, 1, 4) for _ in "qkv"), part, causal=True)
    with pytest.raises(ValueError, match=r"attn='sdpa_docs' cannot attend a context-parallel shard .*attn='auto'"):
        GPT(GPTConfig(vocab_size=8, max_len=8, n_layers=1, dim=8, n_heads=2), attn="sdpa_docs")(part)
    assert isinstance(part.context, ContextShard)


def torchrun(*args, nproc):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)


@pytest.mark.parametrize("world, causal, regather, spread", [(2, True, False, "all"), (3, False, False, "all"),
                                                             (4, True, True, "all"), (4, True, False, "fewest"),
                                                             (4, True, True, "fewest-1")],
                         ids=["2-causal", "3-bidirectional", "4-causal-regather", "4-causal-fewest",
                              "4-causal-regather-fewest-1"])
def test_a_varlen_kernel_through_the_real_all_gather_gives_each_documents_attention(tmp_path, world, causal, regather,
                                                                                    spread):
    # The kernel path under torchrun: each rank's one call on keys copied from the all-gathered
    # tokens, the key gradients added and returned through the all-gather's backward to the ranks
    # that own them. fp64 against each document alone. "fewest": ranks send unequal cut tokens
    # (gloo's uneven path, one broadcast a rank), and with split fraction 1 two ranks send none.
    sys.path.insert(0, str(Path(__file__).parent))
    from benchmarks.cp import document_attention
    from test_context_exact import ROWS, SPREADS, row_of

    proc = torchrun(str(Path(__file__).parent / "cp_kernel_worker.py"), str(tmp_path / "rank"), "1" if causal else "0",
                    "1" if regather else "0", spread, nproc=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch, q, k, v = row_of(ROWS["mixed"])
    layout = plan_layout(batch_blocks(batch), world, **SPREADS[spread])
    sent = [layout.split_len(r) for r in range(world)]
    assert {"all": all(sent), "fewest": sent == [56, 54, 45, 44], "fewest-1": sent == [0, 49, 48, 0]}[spread], sent
    parts = [torch.load(tmp_path / f"rank.{r}") for r in range(world)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = document_attention(*leaves, batch.seq_lens, causal=causal)
    ref.backward(torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert rel(unshard([p["out"][None] for p in parts], layout)[0], ref.detach()) <= 1e-12
    for i, leaf in enumerate(leaves):
        assert rel(unshard([p["grads"][i][None] for p in parts], layout)[0], leaf.grad) <= 1e-12, "dq dk dv"[3 * i:3 * i + 2]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_all_gather_moves_unequal_parts_unpadded_and_returns_each_ranks_gradient(world):
    # Equal parts, parts of 0 to N - 1 numbers, and every other rank sending none: on gloo, and on
    # the NCCL branch's collectives where gloo has them (the worker says which). Each rank checks
    # the gathered numbers and its part's gradient, summed over the ranks, exactly.
    proc = torchrun(str(Path(__file__).parent / "all_gather_worker.py"), nproc=world)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("world, causal, data, wrap, regather", [
    (2, True, 1, "ddp", False), (3, True, 1, "ddp", False), (2, False, 1, "ddp", False), (3, True, 1, "ddp", True),
    (4, True, 2, "ddp", False), (4, True, 2, "fsdp", False)],
    ids=["2-causal", "3-causal", "2-bidirectional", "3-causal-regather", "data-2-x-context-2", "fsdp2-data-2-x-context-2"])
def test_ranks_train_as_one_process(tmp_path, world, causal, data, wrap, regather):
    # Each row cut across the context ranks (a long document head-and-tail, short ones whole, a
    # padding tail), rows accumulated under one global count, and with data=2 a (data, context)
    # mesh under DDP or FSDP2: the gradients, the loss and the unsharded logits equal one process running
    # each row whole, with exact per-document attention.
    sys.path.insert(0, str(Path(__file__).parent))
    import cp_worker

    out = tmp_path / "cp.pt"
    proc = torchrun(str(Path(__file__).parent / "cp_worker.py"), str(out), "1" if causal else "0", str(data), wrap,
                    "1" if regather else "0", nproc=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert any(got["cut"])  # a document was cut across the ranks

    torch.manual_seed(0)
    model = GPT(cp_worker.CONFIG, attn="naive")
    batches = cp_worker.rows()
    total = sum(b.num_targets for b in batches)
    loss = torch.zeros(())
    for i, batch in enumerate(batches):
        out_logits = model(batch, causal=causal)
        step = lm_loss(out_logits, batch, normalizer=total)
        step.backward()
        loss += step.detach()
        if i in got["rows"]:  # rank 0's rows: their logits, unsharded
            n = batch.num_tokens  # the padding tail's logits are not compared: nothing reads them
            assert rel(got["logits"][got["rows"].index(i)][0, :n], out_logits[0, :n].detach()) <= TOL
    assert rel(got["loss"], loss) <= TOL
    for name, p in model.named_parameters():
        assert rel(got["grads"][name], p.grad) <= TOL, name


@pytest.mark.parametrize("world, arch", [(2, "llama"), (3, "llama"), (2, "gemma2"), (2, "gpt_oss")])
def test_a_transformers_model_trains_context_parallel_unchanged(tmp_path, world, arch):
    # pack(model).kwargs of each rank's shard into the model's own forward: the model's loss and the
    # chunked loss, summed over the ranks, and their gradients equal one process on the whole rows.
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_cp_worker

    out = tmp_path / "hf_cp.pt"
    proc = torchrun(str(Path(__file__).parent / "hf_cp_worker.py"), str(out), arch, nproc=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)

    from packing.interop.hf import pack

    lm = hf_cp_worker.model(arch)
    packed = pack(lm)
    kwargs = [packed(samples) for samples in hf_cp_worker.rows()]
    total = sum(int((kw["shift_labels"] != -100).sum()) for kw in kwargs)
    loss = torch.zeros(())
    for kw in kwargs:
        step = packed.loss(kw, normalizer=total)
        step.backward()
        loss += step.detach()
    assert rel(got["loss"], loss) <= TOL and rel(got["chunked"], loss) <= TOL
    for name, p in lm.named_parameters():
        assert rel(got["grads"][name], p.grad) <= TOL, name
        assert rel(got["chunked_grads"][name], p.grad) <= TOL, name


def test_a_transformers_shard_refuses_what_context_parallelism_does_not_compute():
    import transformers

    from packing.context import ContextCollator
    from packing.interop.hf import pack

    def tiny(arch, **extra):
        torch.manual_seed(0)
        if arch == "gemma2":
            config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                               final_logit_softcapping=None, attn_logit_softcapping=None,
                                               attn_implementation="packing_varlen", **extra)
            return transformers.Gemma2ForCausalLM(config)
        config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, **extra)
        return transformers.LlamaForCausalLM(config)

    samples = [torch.arange(1, 12), torch.arange(3, 9)]
    gemma = tiny("gemma2")  # a 4-token window, shorter than the documents: computed under context parallelism
    packed = pack(gemma)
    kwargs = packed.kwargs(ContextCollator(packed.collator, world_size=1, rank=0)(samples))
    assert rel(gemma(**kwargs).loss, gemma(**packed(samples)).loss) <= TOL
    torch.manual_seed(0)
    oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, sliding_window=6, attn_implementation="packing_varlen"))
    packed = pack(oss)  # sinks and a window: computed under context parallelism
    kwargs = packed.kwargs(ContextCollator(packed.collator, world_size=1, rank=0)(samples))
    assert rel(oss(**kwargs).loss, oss(**packed(samples)).loss) <= TOL
    from packing.interop.hf_attention import LayerOptions, _context

    q = torch.zeros(4, 2, 8)  # per-token sinks (1, H, T, 1): refused before any attention runs
    with pytest.raises(ValueError, match=r"takes attention sinks per head, \(H,\), and this layer gives per-token sinks "
                                         r"of shape \(1, 2, 4, 1\); train this model without context parallelism"):
        _context(q, q, q, None, None, LayerOptions(causal=True, sinks=torch.zeros(1, 2, 4, 1)), "packing_varlen")
    sdpa = tiny("llama", attn_implementation="sdpa")
    packed = pack(sdpa)
    with pytest.raises(ValueError, match=r"a context-parallel shard needs attn_implementation 'packing_varlen' .*runs 'sdpa'"):
        packed.kwargs(ContextCollator(packed.collator, world_size=1, rank=0)(samples))
    # One rank: the shard's kwargs are the row's, through the context-parallel attention.
    llama = tiny("llama", attn_implementation="packing_varlen")
    packed = pack(llama)
    whole = llama(**packed(samples)).loss
    part = llama(**packed.kwargs(ContextCollator(packed.collator, world_size=1, rank=0)(samples))).loss
    assert rel(part, whole) <= TOL
