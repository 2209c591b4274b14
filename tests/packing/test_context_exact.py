"""Context-parallel attention against each document alone in fp64, every rank simulated in one
process (the keys each rank's all-gather would give it), with the leakage probe and its negative
controls. The collective itself runs under torchrun in tests/benchmarks/test_cp.py."""

import re
from dataclasses import replace

import pytest
import torch

from benchmarks.cp import document_attention
from packing import get_collator
from packing.context import batch_blocks, plan_layout, shard, unshard
from packing.context.attention import attend_chunks, simulated_keys
from packing.context.shard import local_index

# 1-token documents, documents shorter than 2N, lengths that divide nothing, one document spanning a row.
ROWS = {"mixed": [1, 3, 97, 1, 5, 61, 2, 7, 1, 13, 41, 11, 1, 12], "one document": [211], "tiny": [1, 1, 2, 1, 3, 9]}
HEADS, KV_HEADS, DIM = 4, 2, 8


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def row_of(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = get_collator("concat")([torch.randint(0, 50, (n,), generator=g).tolist() for n in lens])
    q, k, v = (torch.randn(batch.num_slots, h, DIM, generator=g, dtype=torch.float64) for h in (HEADS, KV_HEADS, KV_HEADS))
    return batch, q, k, v


def sharded(batch, q, k, v, world, causal, *, split_tokens=None, spread="all", split_fraction=0.5, align=1,
            broken=None, **options):
    """Every rank's (out, lse), simulated and unsharded: (T, H, D) and (T, H)."""
    layout = plan_layout(batch_blocks(batch), world, split_tokens=split_tokens, spread=spread,
                         split_fraction=split_fraction, align=align)
    outs, lses = [], []
    for r in range(world):
        part = shard(batch, layout, r)
        idx = local_index(layout, r)
        gathered = simulated_keys(k, v, part.context)
        if broken == "no gather" and gathered is not None:  # the cut documents' keys from other ranks never arrive
            gathered = torch.zeros_like(gathered)
        out, lse = attend_chunks(q[idx], k[idx], v[idx], gathered, part, causal=causal, return_lse=True, **options)
        outs.append(out[None])
        lses.append(lse[None])
    return unshard(outs, layout)[0], unshard(lses, layout)[0]


# "all": split_tokens=4 cuts every document of 2N tokens or more over every rank, so the cut path
# meets every length here; "fewest": the default threshold, each cut document over the fewest ranks
# its work needs (at N >= 3 on the mixed row, some over fewer than N); "fewest-1": split fraction 1,
# so a cut block spans fewer ranks and some ranks all-gather nothing. "-align-3": chunks start at
# multiples of 3 tokens from their document's start where each chunk keeps 3 or more, so chunks of
# unequal lengths, and at any token in shorter documents.
SPREADS = {"all": {"split_tokens": 4}, "fewest": {"spread": "fewest"}, "fewest-1": {"spread": "fewest", "split_fraction": 1},
           "all-align-3": {"split_tokens": 4, "align": 3}, "fewest-align-3": {"spread": "fewest", "align": 3}}


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("spread", sorted(SPREADS))
def test_every_rank_gives_each_documents_own_attention_and_gradients(world, row, causal, spread):
    batch, q, k, v = row_of(ROWS[row])
    options = SPREADS[spread]
    layout = plan_layout(batch_blocks(batch), world, **options)
    if not all(layout.chunks):  # "tiny" on 8 ranks: 6 documents, none of 2N tokens
        with pytest.raises(ValueError, match=r"rank \d holds no tokens of this row \(17 tokens over 8 ranks\); use fewer"):
            sharded(batch, q, k, v, world, causal, **options)
        assert (row, world) == ("tiny", 8)
        return
    g = torch.Generator().manual_seed(1)
    d_out, d_lse = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(q.shape[:2], generator=g, dtype=torch.float64)
    got_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sharded(batch, *got_leaves, world, causal, **options)
    ref_out, ref_lse = document_attention(*ref_leaves, batch.seq_lens, causal=causal)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    ((ref_out * d_out).sum() + (ref_lse * d_lse).sum()).backward()
    assert rel(out, ref_out) <= 1e-12 and rel(lse, ref_lse) <= 1e-12
    for name, a, b in zip("qkv", got_leaves, ref_leaves):
        assert rel(a.grad, b.grad) <= 1e-12, f"d{name}"
    cut_over = {}  # cut block -> the ranks holding it
    for r, rank in enumerate(layout.chunks):
        for c in rank:
            if c.split:
                cut_over.setdefault(c.block, set()).add(r)
    if options.get("spread", "all") == "all":
        assert all(len(ranks) == world for ranks in cut_over.values())
        assert cut_over or max(ROWS[row]) < 2 * world
    elif row == "mixed" and world >= 3:
        assert any(2 <= len(ranks) < world for ranks in cut_over.values()), cut_over


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("options", [{"window": 5}, {"softcap": 2.0, "scale": 0.3}, {"window": 1, "softcap": 1.5}],
                         ids=["window", "softcap-scale", "window-1-softcap"])
def test_a_window_and_a_softcap_cross_the_cut_exactly(world, options):
    # A 5-token window is shorter than the cut documents' chunks and longer than some: a chunk's first
    # queries reach back into the previous chunk's keys, on another rank.
    batch, q, k, v = row_of(ROWS["mixed"])
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in "ab"]
    out, lse = sharded(batch, *leaves[0], world, True, split_tokens=4, **options)
    ref_out, ref_lse = document_attention(*leaves[1], batch.seq_lens, causal=True, **options)
    (out.square().sum() + lse.sum()).backward()
    (ref_out.square().sum() + ref_lse.sum()).backward()
    assert rel(out, ref_out) <= 1e-12 and rel(lse, ref_lse) <= 1e-12
    for a, b in zip(*leaves):
        assert rel(a.grad, b.grad) <= 1e-12
    if "window" in options:  # the negative control: the same row without the window differs
        assert rel(sharded(batch, q, k, v, world, True, split_tokens=4)[0], ref_out.detach()) > 1e-3


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("window", [None, 5], ids=["sinks", "sinks-window"])
def test_attention_sinks_cross_the_cut_exactly(world, window):
    # gpt-oss: a learned logit a head in every query's softmax. Each chunk attends its whole prefix
    # in one softmax, so the sink counts once a query, as in the whole row; its gradient too.
    batch, q, k, v = row_of(ROWS["mixed"])
    leaves = [[t.clone().requires_grad_() for t in (q, k, v, torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64))]
              for _ in "ab"]
    out, lse = sharded(batch, *leaves[0][:3], world, True, split_tokens=4, window=window, sinks=leaves[0][3])
    ref_out, ref_lse = document_attention(*leaves[1][:3], batch.seq_lens, causal=True, window=window, sinks=leaves[1][3])
    (out.square().sum() + lse.sum()).backward()
    (ref_out.square().sum() + ref_lse.sum()).backward()
    assert rel(out, ref_out) <= 1e-12 and rel(lse, ref_lse) <= 1e-12
    for a, b in zip(*leaves):
        assert rel(a.grad, b.grad) <= 1e-12
    # the negative control: the same row without the sinks differs
    assert rel(sharded(batch, q, k, v, world, True, split_tokens=4, window=window)[0], ref_out.detach()) > 1e-2


def test_sinks_are_one_logit_a_head():
    batch, q, k, v = row_of(ROWS["tiny"])
    for sinks in (torch.zeros(2, dtype=torch.float64), torch.zeros(1, HEADS, batch.num_slots, 1, dtype=torch.float64)):
        with pytest.raises(ValueError, match=re.escape(f"sinks has shape {tuple(sinks.shape)}; context-parallel attention "
                                                       f"takes one sink logit a head, ({HEADS},): per-token sinks are not computed")):
            sharded(batch, q, k, v, 2, True, sinks=sinks)


def test_a_window_needs_causal_attention():
    batch, q, k, v = row_of(ROWS["tiny"])
    with pytest.raises(ValueError, match=r"window is 4 with causal=False; a sliding window is a positive int of keys, and causal"):
        sharded(batch, q, k, v, 2, False, window=4)
    with pytest.raises(ValueError, match=r"softcap is -1.0; expected a positive number or None"):
        sharded(batch, q, k, v, 2, True, softcap=-1.0)


@pytest.mark.parametrize("row, spread", [("one document", "all"), ("mixed", "fewest")])
def test_without_the_gather_the_cut_documents_are_wrong(row, spread):
    # The negative control of the all-gather: a chunk that sees only its own rank's keys is far off
    # (on the mixed row, documents cut over 2 and 3 of the 4 ranks).
    batch, q, k, v = row_of(ROWS[row])
    out, _ = sharded(batch, q, k, v, 4, True, broken="no gather", spread=spread)
    ref, _ = document_attention(q, k, v, batch.seq_lens, causal=True)
    assert rel(out, ref) > 1e-2


@pytest.mark.parametrize("world", [2, 3, 8])
def test_changing_one_token_changes_only_its_own_document(world):
    # The leakage probe: a new key and value at one position of document k leave every output outside
    # document k unchanged, bitwise. Its negative control: the same probe on the same tokens collated as
    # one document (the boundaries switched off) sees the change leak.
    lens = ROWS["mixed"]
    batch, q, k, v = row_of(lens)
    starts = torch.tensor([0, *lens]).cumsum(0).tolist()
    doc = 5  # 61 tokens, cut across the ranks
    pos = starts[doc] + 17
    k2, v2 = k.clone(), v.clone()
    k2[pos] += 1.0
    v2[pos] -= 1.0
    outside = torch.ones(batch.num_slots, dtype=torch.bool)
    outside[starts[doc]:starts[doc + 1]] = False
    for causal in (True, False):
        before, _ = sharded(batch, q, k, v, world, causal, split_tokens=4)
        after, _ = sharded(batch, q, k2, v2, world, causal, split_tokens=4)
        assert torch.equal(before[outside], after[outside])
        assert not torch.equal(before[~outside], after[~outside])

        whole = get_collator("concat")([sum((list(range(n)) for n in lens), [])])  # one document: no boundaries
        before, _ = sharded(whole, q, k, v, world, causal, split_tokens=4)
        after, _ = sharded(whole, q, k2, v2, world, causal, split_tokens=4)
        assert not torch.equal(before[outside], after[outside])


def bottom_right(q, k, v, cu_q, cu_k, max_q, max_k, causal, *, scale=None, window=None, sinks=None,
                 keys_from_queries=False, top_left=False):
    """A varlen kernel written out: sequence i's queries against its keys, causal aligned bottom-right
    (or, to be refused, top-left; or reading the queries' boundaries for the keys)."""
    cu_k = cu_q if keys_from_queries else cu_k
    outs = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ki, vi = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0) for t in (k, v))
        lq, lk = qi.shape[1], ki.shape[1]
        mask = None
        if causal:
            mask = torch.ones(lq, lk, dtype=torch.bool).tril(0 if top_left else lk - lq)
            if window is not None:
                mask &= torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq - window + 1)
        if sinks is None:
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1))
            continue
        logits = qi @ ki.transpose(-1, -2) * (qi.shape[-1] ** -0.5 if scale is None else scale)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        lse = torch.logaddexp(logits.logsumexp(-1, keepdim=True), sinks[:, None, None])
        outs.append(((logits - lse).exp() @ vi).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("order", ["planned", "tails first"])
@pytest.mark.parametrize("spread", sorted(SPREADS))
def test_a_varlen_kernel_with_the_chunks_boundaries_gives_the_same_rows_and_gradients(world, order, spread):
    # "tails first": each rank's cut chunks listed tail before head; the one call follows the local
    # order whatever it is.
    batch, q, k, v = row_of(ROWS["mixed"])
    layout = plan_layout(batch_blocks(batch), world, **SPREADS[spread])
    if order == "tails first":
        layout = replace(layout, chunks=tuple(tuple(c for c in rank if c.split)[::-1] + tuple(c for c in rank if not c.split)
                                              for rank in layout.chunks))
    for causal in (True, False):
        leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in "ab"]
        ref, _ = document_attention(*leaves[1], batch.seq_lens, causal=causal)
        outs = []
        for r in range(world):
            part = shard(batch, layout, r)
            idx = local_index(layout, r)
            got_q, got_k, got_v = leaves[0]
            outs.append(attend_chunks(got_q[idx], got_k[idx], got_v[idx], simulated_keys(got_k, got_v, part.context), part,
                                      causal=causal, kernel=bottom_right)[None])
        out = unshard(outs, layout)[0]
        assert rel(out, ref) <= 1e-12
        out.square().sum().backward()
        ref.square().sum().backward()
        for a, b in zip(*leaves):
            assert rel(a.grad, b.grad) <= 1e-12


def test_a_kernel_is_checked_before_first_use_and_a_wrong_one_refused():
    from functools import partial

    from packing.context.varlen import check_kernel

    cpu = torch.device("cpu")
    assert check_kernel("written out", bottom_right, cpu, torch.float32, 16) <= 1e-5
    assert check_kernel("written out", bottom_right, cpu, torch.float32, 16, frozenset({"window", "scale"})) <= 1e-5
    assert check_kernel("written out", bottom_right, cpu, torch.float32, 16, frozenset({"sinks", "window"})) <= 1e-5
    with pytest.raises(ValueError, match=r"the varlen kernel 'no sinks' is not exact .* at head dim 16 with sinks: "):
        check_kernel("no sinks", lambda *a, sinks=None, **kw: bottom_right(*a, **kw), cpu, torch.float32, 16,
                     frozenset({"sinks"}))
    with pytest.raises(ValueError, match=r"the varlen kernel 'no window' is not exact .* at head dim 16 with window: "):
        check_kernel("no window", lambda *a, window=None, **kw: bottom_right(*a, **kw), cpu, torch.float32, 16,
                     frozenset({"window"}))
    for name, wrong in (("top-left", partial(bottom_right, top_left=True)),
                        ("one set of boundaries", partial(bottom_right, keys_from_queries=True))):
        with pytest.raises(ValueError, match=rf"the varlen kernel '{name}' is not exact for a context-parallel chunk on cpu "
                                             r"in float32 at head dim 16: relative error .* against fp64, where the masked path "
                                             r"in the same dtype is off by .*aligned bottom-right"):
            check_kernel(name, wrong, cpu, torch.float32, 16)


def test_a_kernel_call_refuses_return_lse_and_the_collator_refuses_a_bad_regather():
    from packing.context import ContextCollator

    batch, q, k, v = row_of(ROWS["tiny"])
    part = shard(batch, plan_layout(batch_blocks(batch), 1), 0)
    with pytest.raises(ValueError, match=r"return_lse is computed on the masked path only \(kernel=None\)"):
        attend_chunks(q, k, v, simulated_keys(k, v, part.context), part, causal=True, return_lse=True,
                      kernel=bottom_right)
    with pytest.raises(TypeError, match=r"regather is 'yes'; expected True or False"):
        ContextCollator(get_collator("concat"), world_size=2, rank=0, regather="yes")


@pytest.mark.parametrize("has_gqa", [False, True], ids=["torch-2.11", "torch-2.13"])
def test_torchs_chunk_kernel_loads_with_and_without_enable_gqa(monkeypatch, has_gqa):
    # torch 2.11's varlen_attn has window_size and no enable_gqa (fewer key/value heads go to the
    # kernel as they are); later ones have both. Either way the chunk form loads, and passes the
    # chunks' own boundaries, a bottom-right window and enable_gqa only where it exists.
    import torch.nn.attention.varlen as varlen_module

    from packing.kernels import _torch_chunks

    calls = []
    if has_gqa:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
            calls.append(dict(cu_q=cu_seq_q, cu_k=cu_seq_k, max_q=max_q, max_k=max_k, window_size=window_size, enable_gqa=enable_gqa))
            return query
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
            calls.append(dict(cu_q=cu_seq_q, cu_k=cu_seq_k, max_q=max_q, max_k=max_k, window_size=window_size))
            return query
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = _torch_chunks()
    assert run is not None
    q, k = torch.zeros(6, 4, 8), torch.zeros(10, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 6]), torch.tensor([0, 4, 10])
    run(q, k, k, cu_q, cu_k, 4, 6, True, window=3)
    call = calls[-1]
    assert call["cu_q"] is cu_q and call["cu_k"] is cu_k and (call["max_q"], call["max_k"]) == (4, 6)
    assert call["window_size"] == (2, 0) and call.get("enable_gqa", None) == (True if has_gqa else None)
    with pytest.raises(ValueError, match=r"torch.varlen_attn"):
        run(q, k, k, cu_q, cu_k, 4, 6, True, softcap=2.0)


def test_one_kernel_call_gives_each_chunk_exactly_its_keys_and_adds_the_copies_gradients():
    # One 16-token document and a 2-token one on 2 ranks: rank 0 holds chunks [0, 4) and [12, 16)
    # (pieces 0 and 1 of the gathered tokens), whose causal keys are [0, 4) and [0, 16); rank 1
    # [4, 8) and [8, 12) (pieces 2 and 3) and the whole document [16, 18). Rank 0's call reads
    # piece 0 for its head, then pieces 0, 2, 3, 1 for its tail: piece 0 twice, so its gradient is
    # the sum of the keys at offsets 0 and 4.
    batch = get_collator("concat")([list(range(16)), [1, 2]])
    layout = plan_layout(batch_blocks(batch), 2)
    assert [[(c.start, c.end, c.split) for c in rank] for rank in layout.chunks] == [
        [(0, 4, True), (12, 16, True)], [(4, 8, True), (8, 12, True), (16, 18, False)]]
    call = shard(batch, layout, 0).context.kernel_call[True]
    assert call.pieces == ((4, 4), (4, 4)) and call.reads == (0, 0, 2, 3, 1)
    assert call.cu_q.tolist() == [0, 4, 8] and call.cu_k.tolist() == [0, 4, 20] and (call.max_q, call.max_k) == (4, 16)
    assert call.sums == (((0, 4), (4,)),) and call.grads == ((2, 0), (1, 4), (1, 2), (1, 3))
    # Rank 1: head [4, 8) reads pieces 0, 2; tail [8, 12) reads 0, 2, 3: pieces 0 and 2 are one
    # stretch read twice; piece 1 is read by no chunk of rank 1 (zeros); the whole document's 2
    # keys are its own, after the cut keys.
    call = shard(batch, layout, 1).context.kernel_call[True]
    assert call.reads == (0, 2, 0, 2, 3) and call.cu_k.tolist() == [0, 8, 20, 22]
    assert call.sums == (((0, 8), (4, 4)),) and call.grads == ((2, 0), (0, 0), (2, 1), (1, 4))
    # Bidirectional: every chunk reads its whole block.
    assert shard(batch, layout, 0).context.kernel_call[False].reads == (0, 2, 3, 1) * 2
    # One rank: nothing gathered, one call over the local rows as they are.
    whole = shard(batch, plan_layout(batch_blocks(batch), 1), 0).context.kernel_call[True]
    assert not whole.reads and not whole.pieces and whole.cu_k.tolist() == whole.cu_q.tolist() == [0, 16, 18]
    # A mixed row at N = 8 (ranks sending unequal cut tokens): each cut chunk's keys are exactly its
    # block's prefix, and every read piece's gradient comes from all its reads.
    batch, *_ = row_of(ROWS["mixed"])
    layout = plan_layout(batch_blocks(batch), 8, split_tokens=4)
    assert len({layout.split_len(r) for r in range(8)}) > 1
    for r in range(8):
        for causal in (True, False):
            call = shard(batch, layout, r).context.kernel_call[causal]
            assert [sum(rank) for rank in call.pieces] == [layout.split_len(q) for q in range(8)]
            lens = [(c.end if causal else c.block_end) - c.block_start if c.split else c.length for c in layout.chunks[r]]
            assert call.cu_k.diff().tolist() == lens and call.cut_keys == sum(lens[:len([c for c in layout.chunks[r] if c.split])])
            reads = {p: call.reads.count(p) for p in set(call.reads)}
            for p, (kind, i) in enumerate(call.grads):
                assert (kind == 0) == (p not in reads) and (kind == 1) == (reads.get(p) == 1)
                if kind >= 2:
                    starts, lengths = call.sums[kind - 2]
                    assert len(starts) == reads[p] and lengths[i] == call.sizes[p]
