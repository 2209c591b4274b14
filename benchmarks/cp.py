"""Context parallelism, checked across ranks and simulated on one GPU.

    torchrun --nproc-per-node N -m benchmarks.cp --device cpu --check [--lengths FILE]
    torchrun --nproc-per-node N -m benchmarks.cp --device cuda --check --tokens 131072 [--lengths FILE]
    python -m benchmarks.cp --simulate N --device cuda [--lengths FILE] [--json PATH]

``--check`` (under torchrun, gloo on a CPU, fp64): the context-parallel attention of N ranks against
one process on the same row (outputs, log-sum-exp, dQ/dK/dV, causal and bidirectional), then a tiny
toy GPT trained ``--steps`` steps at CP=N and, on every rank, at CP=1 on the same packs (the loss
and every parameter's gradient at each step, the same SGD update on both). Its last line is::

    cp=N exact: loss rel X, grads rel Y; balance max/mean Z; padding P%

X and Y are the largest relative errors over the steps (gradients as one vector), Z the worst
row's max/mean work per rank by the layout's cost model, and P the padding, measured over the rows'
tokens: the tokens the ranks hold beyond the row's, plus the token slots the all-gather moved
beyond the cut documents' tokens. It exits 1 when the
attention is off by more than 1e-12 or the model by more than 1e-10.

``--check --device cuda`` (under torchrun; NCCL with a GPU a rank, else gloo with ranks sharing
GPUs, which checks the numbers but times nothing): one row's attention at N ranks in bf16, in the
kernel ``--simulate`` would use (``--heads``, ``--kv-heads``, ``--head-dim``), against the same
kernel on the unsharded row and fp32 SDPA on each document alone: outputs and dQ/dK/dV within
TransformerEngine's context-parallel tolerances of the unsharded row (2.5e-2 MHA, 3.5e-2 GQA, RMSE
within 1% of the range), and no further from fp32 than it (1.1x). It exits 1 otherwise.

``--simulate N`` (one process): each rank's local attention, forward and backward, one rank after
another on one device, from its shard of one row (its queries, and the keys and values the
all-gather would give it); then the same row unsharded, by the same code and kernel (one rank). On
CUDA the kernel is the first varlen kernel that takes the chunks' own boundaries and passes its
check (``--kernel`` names one, or ``masked`` for SDPA with a mask per chunk). It times the
contiguous split (rank r holds tokens [r·T/N, (r+1)·T/N)) as the baseline, then the head-tail
layout at each ``--split-fraction`` (documents whose work is above that fraction of a rank's share
are cut; the rest stay whole) and each ``--spread`` (``all``: a cut document in 2N chunks over every
rank; ``fewest``: in 2m over the fewest ranks m that keep each one's part within the fraction) and
each ``--align`` (a cut document's chunks start at multiples of that many tokens from its start:
128 by default, 1 for any token). For
each it prints every rank's time, max/mean, the
slowest rank's time x N over the unsharded row's (1.00 is perfect scaling of attention) and the
ranks' sum over it; with a kernel, the same for the kernel calls alone (the cut chunks' keys picked
beforehand), which tells the kernel's time from the copies around it; on CUDA, the same for the
step's GPU-busy time (its kernels and copies summed from the profiler), which leaves out the host's
launch gaps that a model's other layers fill. It also prints the tokens all-gathered, as a share
of the row's (each rank's cut-document tokens, unpadded). No collective runs: the all-gather's time is the multi-GPU run's
to measure.

The rows: ``--lengths FILE`` holds document lengths, whitespace-separated positive ints. ``--check``
packs them in order into rows of ``--tokens``; ``--simulate`` takes them all as one row. Without a
file, ``--check`` uses one document spanning a row and a row of 1-token documents, documents shorter
than 2N and lengths that divide nothing; ``--simulate`` a 131,072-token row of log-normal lengths
(mu 7.5, sigma 1.4, seed 0).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.harness import Parser, environment, exit_after_distributed
from packing import get_collator
from packing.context import batch_blocks, plan_layout, shard, unshard
from packing.context.attention import attend_chunks, call_keys, context_attention, gather_keys, simulated_keys
from packing.context.layout import ALIGN, AREA_COST, SPREADS, Chunk, ContextLayout
from packing.context.shard import local_index
from packing.context.varlen import chunk_kernel
from packing.kernels import chunk_varlen_kernels

# One document spanning a row, then a row of 1-token documents, documents shorter than 2N and
# lengths that divide nothing (256 tokens each).
CHECK_LENGTHS = [256, 1, 3, 97, 1, 5, 61, 2, 7, 1, 13, 41, 11, 1, 12]
ATTENTION_TOL, MODEL_TOL = 1e-12, 1e-10


def read_lengths(path: str) -> list[int]:
    """Document lengths from a text file: whitespace-separated positive ints, nothing else."""
    try:
        words = Path(path).read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--lengths {path}: cannot read it as text ({e})") from None
    lengths = []
    for i, word in enumerate(words):
        if not word.isdigit() or int(word) < 1:
            raise ValueError(f"--lengths {path}: entry {i + 1} is {word[:20]!r}; expected document lengths as "
                             "whitespace-separated positive ints")
        lengths.append(int(word))
    if not lengths:
        raise ValueError(f"--lengths {path}: no lengths; expected document lengths as whitespace-separated positive ints")
    return lengths


def pack_rows(lengths: list[int], tokens: int) -> list[list[int]]:
    """The lengths in order, a row closed when the next document does not fit in ``tokens``."""
    rows: list[list[int]] = [[]]
    for n in lengths:
        if n > tokens:
            raise ValueError(f"a document of {n} tokens is longer than a row (--tokens {tokens}); raise --tokens")
        if sum(rows[-1]) + n > tokens:
            rows.append([])
        rows[-1].append(n)
    return rows


def document_attention(q, k, v, seq_lens, *, causal: bool, scale: float | None = None, window: int | None = None,
                       softcap: float | None = None, sinks: torch.Tensor | None = None):
    """The reference: each document's attention alone, softmax written out. q (T, H, D), k and v
    (T, H_kv, D) -> out (T, H, D) and log-sum-exp (T, H). ``window``: a query sees its ``window``
    latest keys (itself included); ``softcap``: logits capped as softcap * tanh(logits / softcap);
    ``sinks``: (H,) a logit a head in every softmax, attending nothing (counted in the log-sum-exp)."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses, start = [], [], 0
    for n in seq_lens:
        qd, kd, vd = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
        logits = qd @ kd.transpose(-1, -2) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        if window is not None:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-window), float("-inf"))
        lse = logits.logsumexp(-1, keepdim=True)
        if sinks is not None:
            lse = torch.logaddexp(lse, sinks[:, None, None])
        outs.append(((logits - lse).exp() @ vd).transpose(0, 1))
        lses.append(lse[..., 0].transpose(0, 1))
        start += n
    return torch.cat(outs), torch.cat(lses)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def worst_balance(rows, world: int, **options) -> float:
    """The worst max/mean work per rank of the rows' layouts (``options`` to plan_layout), by the
    layout's cost model."""
    return max(max(work) / statistics.mean(work) for work in (plan_layout(lens, world, **options).work() for lens in rows))


def measured_padding(batch, world: int, rank: int, **options) -> int:
    """Padding tokens of one row cut over the group, measured from what the ranks hold and what the
    all-gather moves (the same on every rank): the tokens held beyond the row's, plus the
    all-gathered token slots beyond the cut documents' tokens."""
    layout = plan_layout(batch_blocks(batch), world, **options)
    part = shard(batch, layout, rank)
    held = torch.tensor(part.num_slots)
    dist.all_reduce(held)
    key = torch.zeros(part.num_slots, 1, 1)  # one number a key and a value: the gather's slots count tokens
    gathered = gather_keys(key, key, part.context)
    slots = 0 if gathered is None else gathered.numel() // 2
    return held.item() - layout.num_slots + slots - layout.gather_tokens


def check_attention(batch, world: int, rank: int, causal: bool, **options) -> dict[str, float]:
    """The N ranks' attention of one row against :func:`document_attention`, fp64: each rank
    computes its part and the gradients of a fixed cotangent, and the parts are unsharded."""
    g = torch.Generator().manual_seed(1)
    T, heads, kv_heads, dim = batch.num_slots, 4, 2, 8
    q_row, k_row, v_row = (torch.randn(T, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    d_out, d_lse = torch.randn(T, heads, dim, generator=g, dtype=torch.float64), torch.randn(T, heads, generator=g, dtype=torch.float64)
    layout = plan_layout(batch_blocks(batch), world, **options)
    part = shard(batch, layout, rank)
    idx = local_index(layout, rank)
    q, k, v = (t[idx].clone().requires_grad_() for t in (q_row, k_row, v_row))
    out, lse = context_attention(q, k, v, part, causal=causal, return_lse=True)
    ((out * d_out[idx]).sum() + (lse * d_lse[idx]).sum()).backward()
    mine = [t.detach()[None] for t in (out, lse, q.grad, k.grad, v.grad)]
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    got = [unshard([p[i] for p in parts], layout)[0] for i in range(5)]

    q_row, k_row, v_row = (t.clone().requires_grad_() for t in (q_row, k_row, v_row))
    ref_out, ref_lse = document_attention(q_row, k_row, v_row, batch.seq_lens, causal=causal)
    ((ref_out * d_out).sum() + (ref_lse * d_lse).sum()).backward()
    ref = [ref_out.detach(), ref_lse.detach(), q_row.grad, k_row.grad, v_row.grad]
    return {name: rel(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}


def check(args, parser: Parser) -> int:
    from models import GPT, GPTConfig, lm_loss

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    lengths = read_lengths(args.lengths) if args.lengths else CHECK_LENGTHS
    rows = pack_rows(lengths, args.tokens)
    if any(sum(r) < world for r in rows):
        raise ValueError(f"a row of {min(sum(r) for r in rows)} tokens cannot give each of {world} ranks a token; "
                         "use longer rows or fewer ranks")
    g = torch.Generator().manual_seed(0)
    collate = get_collator("concat")
    batches = [collate([torch.randint(0, 97, (n,), generator=g).tolist() for n in lens]) for lens in rows]
    say = print if rank == 0 else (lambda *a, **k: None)
    options = {"spread": args.spread[0], "align": args.align[0]}
    say(f"{len(rows)} rows of up to {args.tokens} tokens, {len(lengths)} documents; N={world}, fp64 on cpu"
        + layout_words(**options))

    worst_attention, padding = 0.0, 0
    for i, batch in enumerate(batches):
        padding += measured_padding(batch, world, rank, **options)
        for causal in (True, False):
            errors = check_attention(batch, world, rank, causal, **options)
            worst_attention = max(worst_attention, *errors.values())
            say(f"attention ({'causal' if causal else 'bidirectional'}), row {i}: "
                + ", ".join(f"{name} rel {e:.1e}" for name, e in errors.items()))

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, max_len=args.tokens, n_layers=2, dim=32, n_heads=4)
    model = GPT(config, attn="auto", context_group=dist.group.WORLD).double()
    whole = GPT(config, attn="sdpa_docs").double()  # the reference: each document's attention in the whole row
    whole.load_state_dict(model.state_dict())
    sgd = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, whole)]
    loss_err = grad_err = 0.0
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        part = shard(batch, plan_layout(batch_blocks(batch), world, **options), rank)
        loss = lm_loss(model(part), part, normalizer=part.context.num_targets)  # this rank's share
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss)
        for p in model.parameters():
            dist.all_reduce(p.grad)
        ref = lm_loss(whole(batch), batch)
        ref.backward()
        got_g = torch.cat([p.grad.flatten() for p in model.parameters()])
        ref_g = torch.cat([p.grad.flatten() for p in whole.parameters()])
        loss_err, grad_err = max(loss_err, rel(loss, ref.detach())), max(grad_err, rel(got_g, ref_g))
        say(f"step {step}: loss {ref.item():.6f}, rel {rel(loss, ref.detach()):.1e}; grads rel {rel(got_g, ref_g):.1e}")
        for opt in sgd:
            opt.step()
            opt.zero_grad()
    balance, padding = worst_balance(rows, world, **options), 100 * padding / sum(b.num_slots for b in batches)
    say(f"cp={world} exact: loss rel {loss_err:.1e}, grads rel {grad_err:.1e}; balance max/mean {balance:.3f}; "
        f"padding {padding:.2f}%")
    exact = worst_attention <= ATTENTION_TOL and loss_err <= MODEL_TOL and grad_err <= MODEL_TOL
    dist.barrier()
    dist.destroy_process_group()
    return 0 if exact else 1


# TransformerEngine's context-parallel tests' bf16 tolerances: elementwise atol = rtol (MHA, GQA),
# and the RMSE of the difference against 1% of the values' range.
TE_TOL = {"mha": 2.5e-2, "gqa": 3.5e-2}
TE_RMSE = 0.01


def te_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> tuple[bool, float]:
    """(elementwise within ``tol``, RMSE over the range) of bf16 ``got`` against ``want``."""
    got, want = got.float(), want.float()
    rmse = (got - want).square().mean().sqrt().item()
    span = (torch.maximum(got.max(), want.max()) - torch.minimum(got.min(), want.min())).item()
    return bool(torch.allclose(got, want, atol=tol, rtol=tol)), rmse / max(span, 1e-30)


def document_sdpa(q, k, v, seq_lens, d_out) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of each document's causal attention alone, by SDPA in q's dtype (fp32: the
    reference on a GPU, where the written-out softmax of a 128k document does not fit)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    # Heads repeated rather than enable_gqa, which would send fp32 to the math kernel's (H, n, n) logits
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    outs, start = [], 0
    for n in seq_lens:
        qd, kd, vd = (t[start:start + n].transpose(0, 1)[None] for t in (q, kr, vr))  # (1, H, n, D)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)[0].transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(d_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def rank_device(world: int) -> tuple[torch.device, str]:
    """(this torchrun worker's GPU, the backend): NCCL with a GPU a rank; with fewer GPUs than
    ranks, gloo and ranks sharing GPUs (NCCL refuses two ranks on one GPU): a check of the numbers,
    not of speed."""
    count = torch.cuda.device_count()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
    torch.cuda.set_device(device)
    return device, "nccl" if count >= world else "gloo"


def start_ranks(device: str):
    """This torchrun worker's (device, backend, rank, world size, say), its process group started:
    on ``"cuda"`` a GPU a rank over NCCL (:func:`rank_device`), on ``"cpu"`` gloo; ``say`` prints on
    rank 0 only."""
    world = int(os.environ["WORLD_SIZE"])
    where, backend = rank_device(world) if device == "cuda" else (torch.device("cpu"), "gloo")
    dist.init_process_group(backend)
    rank = dist.get_rank()
    return where, backend, rank, world, (print if rank == 0 else (lambda *a, **k: None))


def check_cuda(args, parser: Parser) -> int:
    """N ranks' bf16 attention of one row (``--lengths``, or a log-normal row of ``--tokens``) on
    GPUs against the same kernel on the unsharded row and fp32 SDPA per document."""
    device, backend, rank, world, say = start_ranks("cuda")
    count = torch.cuda.device_count()
    lens = read_lengths(args.lengths) if args.lengths else lognormal_row(args.tokens)
    batch = get_collator("concat")([[0] * n for n in lens])
    T, H, Hkv, D = batch.num_slots, args.heads, args.kv_heads, args.head_dim
    if T < world:
        raise ValueError(f"the row has {T} tokens, fewer than {world} ranks; give longer --lengths or --tokens")
    found = chunk_kernel(device, torch.bfloat16, D, None if args.kernel == "auto" else (args.kernel,))
    if found is None:
        raise ValueError(f"no varlen kernel that takes chunk boundaries loads here for head dim {D} "
                         f"(loaded: {sorted(chunk_varlen_kernels())}); --check on cuda times no masked path")
    name, kernel = found
    layout = plan_layout(batch_blocks(batch), world, spread=args.spread[0], align=args.align[0])
    cut = len({c.block for chunks in layout.chunks for c in chunks if c.split})
    # With no document cut, no key crosses a rank: say so, the check then covers whole documents only.
    say(f"{T:,} tokens, {len(lens)} documents (longest {max(lens):,}), {cut} cut across the ranks"
        f"{layout_words(args.spread[0], args.align[0])}; N={world} on "
        f"{count} GPU(s), {backend}; bf16, {H}/{Hkv} heads of {D}; {name}", flush=True)
    g = torch.Generator().manual_seed(1)
    q_row, k_row, v_row, d_row = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv, H))
    part = shard(batch, layout, rank).to(device)
    idx = local_index(layout, rank)
    q, k, v = (t[idx].to(device, torch.bfloat16).requires_grad_() for t in (q_row, k_row, v_row))
    out = context_attention(q, k, v, part, causal=True, kernel=kernel)
    out.backward(d_row[idx].to(device, torch.bfloat16))
    mine = torch.cat([out.detach(), q.grad, k.grad, v.grad], dim=1)  # (local, 2H + 2Hkv, D)
    longest = max(layout.local_len(r) for r in range(world))
    parts = [torch.empty(longest, *mine.shape[1:], device=device, dtype=mine.dtype) for _ in range(world)]
    dist.all_gather(parts, F.pad(mine, (0, 0, 0, 0, 0, longest - mine.shape[0])))
    exact = True
    if rank == 0:
        cut = unshard([p[: layout.local_len(r)][None] for r, p in enumerate(parts)], layout)[0]
        got = list(cut.split([H, H, Hkv, Hkv], dim=1))
        whole_layout = plan_layout(batch_blocks(batch), 1)
        whole_part = shard(batch, whole_layout, 0).to(device)
        q1, k1, v1 = (t.to(device, torch.bfloat16).requires_grad_() for t in (q_row, k_row, v_row))
        out1 = attend_chunks(q1, k1, v1, None, whole_part, causal=True, kernel=kernel)
        out1.backward(d_row.to(device, torch.bfloat16))
        whole = [out1.detach(), q1.grad, k1.grad, v1.grad]
        ref = document_sdpa(*(t.to(device) for t in (q_row, k_row, v_row)), batch.seq_lens, d_row.to(device))
        tol = TE_TOL["mha" if H == Hkv else "gqa"]
        for what, a, b, r in zip(("out", "dq", "dk", "dv"), got, whole, ref):
            close, rmse = te_close(a, b, tol)
            cp_err, whole_err = rel(a.float(), r), rel(b.float(), r)
            ok = close and rmse <= TE_RMSE and cp_err <= 1.1 * whole_err
            exact &= ok
            say(f"{what}: cp vs unsharded (bf16): within {tol:g} {close}, rmse/range {rmse:.1e}; vs fp32: cp "
                f"{cp_err:.2e}, unsharded {whole_err:.2e}{'' if ok else '  <- off'}", flush=True)
    flag = torch.tensor([int(exact)], device=device)
    dist.broadcast(flag, 0)
    say(f"cp={world} on cuda: {'exact' if flag.item() else 'NOT exact'} within TransformerEngine's tolerances and "
        "bf16's own error", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if flag.item() else 1


def lognormal_row(tokens: int = 131_072, seed: int = 0) -> list[int]:
    """Document lengths log-normal (mu 7.5, sigma 1.4) filling ``tokens``, the last one cut to fit."""
    g = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(min(int(torch.empty(1).log_normal_(7.5, 1.4, generator=g).item()) + 1, tokens - sum(lens)))
    return lens


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _profiled(fn, repeats: int):
    """The profiler over ``repeats`` calls of ``fn`` on CUDA, after one call outside it."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return prof


def _busy_ms(fn, repeats: int) -> float:
    """Milliseconds the GPU spends in kernels and copies per call of ``fn`` (the profiler's device
    events, summed; one stream, so they do not overlap): the step's time without the host's launch
    gaps, which a model's other layers fill when the GPU runs ahead of the host."""
    events = _profiled(fn, repeats).events()
    busy_us = sum(e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / repeats / 1e3


def _profile_table(fn, repeats: int) -> str:
    """The profiler's table of ``fn``'s GPU kernels and copies over ``repeats`` calls, the most
    GPU time first: where a rank's step spends the time its kernel calls alone do not."""
    return _profiled(fn, repeats).key_averages().table(sort_by="self_cuda_time_total", row_limit=40,
                                                       max_name_column_width=90)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def contiguous_layout(block_lens: list[int], world: int) -> ContextLayout:
    """The baseline a balanced layout is measured against: rank r holds row tokens ``[r·T/N,
    (r+1)·T/N)``, each document cut where a rank's range ends (its pieces' keys gathered)."""
    T = sum(block_lens)
    edges = [r * T // world for r in range(world + 1)]
    starts = [sum(block_lens[:b]) for b in range(len(block_lens))]
    ranks = []
    for r in range(world):
        cut, whole = [], []
        for b, (n, start) in enumerate(zip(block_lens, starts)):
            lo, hi = max(start, edges[r]), min(start + n, edges[r + 1])
            if lo < hi:
                split = (lo, hi) != (start, start + n)
                (cut if split else whole).append(Chunk(b, lo, hi, start, start + n, split))
        ranks.append(tuple(cut + whole))
    return ContextLayout(world, tuple(block_lens), tuple(ranks))


# --spread's layouts by name: over every rank (the name the records before it used), or the fewest.
SPREAD_NAMES = {"all": "", "fewest": " over the fewest ranks"}


def tails_first(layout: ContextLayout) -> ContextLayout:
    """``layout`` with each rank's cut chunks in the opposite order (the tail chunks, which see the
    longest prefixes, first): a varlen kernel starts a call's sequences in order, so the longest
    tiles start first and the short ones fill the last wave."""
    return ContextLayout(layout.world_size, layout.block_lens,
                         tuple(tuple(c for c in rank if c.split)[::-1] + tuple(c for c in rank if not c.split)
                               for rank in layout.chunks), layout.area_cost)


def layout_words(spread: str = "all", align: int = ALIGN) -> str:
    """How the layout cuts documents, for a header line: nothing for the defaults."""
    return (", cut documents over the fewest ranks" if spread == "fewest" else "") + align_words(align)


def align_words(align: int) -> str:
    """Where a layout's cuts fall, for a header line or a simulated layout's name: nothing for the default."""
    return "" if align == ALIGN else ", cut at any token" if align == 1 else f", aligned to {align}"


def simulate(args, parser: Parser) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible; use --device cpu")
    world = args.simulate
    lens = read_lengths(args.lengths) if args.lengths else lognormal_row()
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = get_collator("concat")([[0] * n for n in lens])
    T = batch.num_slots
    if T < world:
        raise ValueError(f"the row has {T} tokens, fewer than --simulate {world} ranks; give longer --lengths")
    g = torch.Generator().manual_seed(0)
    q_row, k_row, v_row = (torch.randn(T, h, args.head_dim, generator=g).to(device, dtype)
                           for h in (args.heads, args.kv_heads, args.kv_heads))
    d_out = torch.randn(T, args.heads, args.head_dim, generator=g).to(device, dtype)
    kernel_name, kernel = "sdpa with a mask per chunk", None
    if args.kernel != "masked":
        found = chunk_kernel(device, dtype, args.head_dim, None if args.kernel == "auto" else (args.kernel,))
        if found is None and args.kernel != "auto":
            raise ValueError(f"--kernel {args.kernel} does not load here; loaded: {sorted(chunk_varlen_kernels())} "
                             "(or --kernel masked)")
        if found is not None:
            kernel_name, kernel = found

    def step_of(layout, rank):
        """(the rank's attention step, the kernel call alone or None): the step copies the cut
        chunks' keys from the gathered tokens (given: the all-gather and its send buffer are not
        timed) and runs the kernel, forward and backward, the key gradients written back into the
        gathered layout; the kernel alone takes the call's keys already copied, to tell the
        kernel's time from the copies around it."""
        part = shard(batch, layout, rank).to(device)
        idx = local_index(layout, rank).to(device)
        q, k, v = (t[idx].detach().requires_grad_() for t in (q_row, k_row, v_row))
        gathered = simulated_keys(k_row, v_row, part.context)
        if gathered is not None:
            gathered = gathered.detach().requires_grad_()
        grad = d_out[idx]

        def step():
            out = attend_chunks(q, k, v, gathered, part, causal=True, kernel=kernel)
            out.backward(grad)
            q.grad = k.grad = v.grad = None
            if gathered is not None:
                gathered.grad = None

        if kernel is None:
            return step, None
        call = part.context.kernel_call[True]
        own = layout.split_len(rank)
        with torch.no_grad():
            k_call, v_call = call_keys(gathered, k[own:], v[own:], call)
        run = [t.detach().requires_grad_() for t in (q, k_call, v_call)]

        def kernel_step():
            kernel(*run, call.cu_q, call.cu_k, call.max_q, call.max_k, True).backward(grad)
            for t in run:
                t.grad = None

        return step, kernel_step

    def timed(step_and_kernel) -> tuple[float, float | None, float | None]:
        """(the step's ms, the kernel alone's ms or None, the step's GPU-busy ms on CUDA or None)."""
        step, kernel_step = step_and_kernel
        return (_time(step, device, args.repeats), None if kernel_step is None else _time(kernel_step, device, args.repeats),
                _busy_ms(step, args.repeats) if device.type == "cuda" else None)

    def profiled(name: str, step_and_kernel) -> None:
        """--profile: the step's and the kernel calls' profiler tables, to ``DIR/<name>.txt``."""
        step, kernel_step = step_and_kernel
        text = f"{name}, the step ({args.repeats} calls):\n{_profile_table(step, args.repeats)}\n"
        if kernel_step is not None:
            text += f"\n{name}, the kernel calls alone ({args.repeats} calls):\n{_profile_table(kernel_step, args.repeats)}\n"
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        (Path(args.profile) / f"{re.sub(r'[^a-z0-9.]+', '_', name.lower())}.txt").write_text(text)

    blocks = batch_blocks(batch)
    whole_ms, whole_kernel_ms, whole_busy_ms = timed(step_of(plan_layout(blocks, 1), 0))
    if args.profile:
        profiled("whole row", step_of(plan_layout(blocks, 1), 0))
    layouts = [("contiguous", contiguous_layout(blocks, world))]
    planned = [(f"head-tail{SPREAD_NAMES[spread]}, split fraction {f:g}" + align_words(a),
                plan_layout(blocks, world, split_fraction=f, area_cost=args.area_cost, spread=spread, align=a))
               for spread in args.spread for f in args.split_fraction for a in args.align]
    for name, layout in planned:
        layouts += [(name + ("" if order == "planned" else ", tails first"), layout if order == "planned" else tails_first(layout))
                    for order in args.order]
    print(f"{T:,} tokens, {len(lens)} documents (longest {max(lens):,}); N={world}; {args.dtype or str(dtype).removeprefix('torch.')}, "
          f"{args.heads}/{args.kv_heads} heads of {args.head_dim}; {device}, {kernel_name}")
    print(f"whole row: {whole_ms:.3f} ms" + ("" if whole_kernel_ms is None else f" (the kernel alone {whole_kernel_ms:.3f} ms)")
          + ("" if whole_busy_ms is None else f"; GPU busy {whole_busy_ms:.3f} ms"))
    results = []
    for name, layout in layouts:
        runs = [timed(step_of(layout, r)) for r in range(world)]
        times = [ms for ms, _, _ in runs]
        result = {"layout": name, "rank_ms": times, "rank_tokens": [layout.local_len(r) for r in range(world)],
                  "max_over_mean": max(times) / statistics.mean(times),
                  "slowest_x_n_over_whole": max(times) * world / whole_ms, "sum_over_whole": sum(times) / whole_ms,
                  "cut_documents": len({c.block for rank in layout.chunks for c in rank if c.split}),
                  "gathered_pct": 100 * layout.gather_tokens / T}
        if whole_kernel_ms is not None:
            kernel_times = [ms for _, ms, _ in runs]
            result |= {"rank_kernel_ms": kernel_times, "kernel_max_over_mean": max(kernel_times) / statistics.mean(kernel_times),
                       "kernel_slowest_x_n_over_whole": max(kernel_times) * world / whole_kernel_ms,
                       "kernel_sum_over_whole": sum(kernel_times) / whole_kernel_ms}
        if whole_busy_ms is not None:
            busy = [ms for _, _, ms in runs]
            result |= {"rank_busy_ms": busy, "busy_max_over_mean": max(busy) / statistics.mean(busy),
                       "busy_slowest_x_n_over_whole": max(busy) * world / whole_busy_ms,
                       "busy_sum_over_whole": sum(busy) / whole_busy_ms}
        results.append(result)
        if args.profile:
            slowest = max(range(world), key=times.__getitem__)
            profiled(f"{name}, rank {slowest}", step_of(layout, slowest))
        print(f"{name}: ranks {', '.join(f'{ms:.3f}' for ms in times)} ms; max/mean {result['max_over_mean']:.3f}; "
              f"slowest x N / whole {result['slowest_x_n_over_whole']:.3f}; sum / whole {result['sum_over_whole']:.3f}; "
              f"documents cut: {result['cut_documents']}; all-gathered {result['gathered_pct']:.1f}% of the row's tokens")
        if whole_kernel_ms is not None:
            print(f"  the kernel alone: max/mean {result['kernel_max_over_mean']:.3f}; slowest x N / whole "
                  f"{result['kernel_slowest_x_n_over_whole']:.3f}; sum / whole {result['kernel_sum_over_whole']:.3f}")
        if whole_busy_ms is not None:
            print(f"  GPU busy: ranks {', '.join(f'{ms:.3f}' for ms in result['rank_busy_ms'])} ms; max/mean "
                  f"{result['busy_max_over_mean']:.3f}; slowest x N / whole {result['busy_slowest_x_n_over_whole']:.3f}; "
                  f"sum / whole {result['busy_sum_over_whole']:.3f}")
    best = results[1]  # the first head-tail layout: the one the last line reports
    record = {**environment(device), "world_size": world, "tokens": T, "docs": len(lens), "longest": max(lens),
              "dtype": args.dtype or str(dtype).removeprefix("torch."), "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "kernel": kernel_name, "area_cost": args.area_cost, "repeats": args.repeats,
              "whole_row_ms": whole_ms, "whole_row_kernel_ms": whole_kernel_ms, "whole_row_busy_ms": whole_busy_ms, "layouts": results,
              "command": parser.command(args.argv)}
    print(f"cp={world} simulated: max/mean {best['max_over_mean']:.3f}; slowest x N / whole row "
          f"{best['slowest_x_n_over_whole']:.3f} (contiguous: {results[0]['max_over_mean']:.3f}, "
          f"{results[0]['slowest_x_n_over_whole']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.cp", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="under torchrun: N ranks against one process, fp64")
    mode.add_argument("--simulate", type=int, metavar="N", help="each of N ranks' attention, one after another")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lengths", metavar="FILE", help="document lengths, whitespace-separated positive ints")
    p.add_argument("--tokens", type=int, default=256, help="--check: tokens a row (default 256); on cuda without "
                   "--lengths, the log-normal row's length")
    p.add_argument("--steps", type=int, default=3, help="--check: training steps (default 3)")
    p.add_argument("--heads", type=int, default=16, help="--simulate: query heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=16, help="--simulate: key/value heads (default 16)")
    p.add_argument("--head-dim", type=int, default=128, help="--simulate: head dimension (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="--simulate: default bf16 on cuda, fp32 on cpu")
    p.add_argument("--kernel", default="auto", help="--simulate: a varlen kernel taking the chunks' own boundaries "
                   "(flash-attn-3, flash-attn-4, flash-attn-2, torch.varlen_attn), auto (the first that loads, checked; the masked "
                   "path if none), or masked (SDPA with a mask per chunk)")
    p.add_argument("--repeats", type=int, default=10, help="--simulate: timed calls a rank (default 10)")
    p.add_argument("--split-fraction", type=float, nargs="+", default=[0.5], metavar="F",
                   help="--simulate: head-tail layouts to time, each cutting documents whose work exceeds F of a "
                   "rank's share (default 0.5; the first is the last line's)")
    p.add_argument("--spread", nargs="+", default=["all"], choices=SPREADS,
                   help="where a cut document goes: all (every rank, 2N chunks; the default) or fewest (the fewest ranks "
                   "its work needs, longer chunks). --simulate times each, at each split fraction; "
                   "--check takes one")
    p.add_argument("--align", type=int, nargs="+", default=[ALIGN], metavar="A",
                   help=f"cut a document's chunks at multiples of A tokens from its start (a kernel's query tile: "
                   f"default {ALIGN}, FlashAttention's; 1 cuts at any token). --simulate times each; --check takes one")
    p.add_argument("--order", nargs="+", default=["planned"], choices=["planned", "tails-first"],
                   help="--simulate: each rank's cut chunks in the layout's order (heads, then tails) or tails first "
                   "(the longest prefixes start first in the kernel call); times each")
    p.add_argument("--area-cost", type=float, default=AREA_COST, help="--simulate: a (query, key) pair's work "
                   f"relative to a token's in the layout's cost model (default {AREA_COST:.3g}, a width-1024 model)")
    p.add_argument("--json", metavar="PATH", help="--simulate: write the record as JSON")
    p.add_argument("--profile", metavar="DIR", help="--simulate on cuda: write the profiler's table of the whole "
                   "row's step and of each layout's slowest rank (the step, and its kernel calls alone) to DIR")
    args = p.parse_args(argv)
    args.argv = argv
    for name in ("tokens", "steps", "heads", "kv_heads", "head_dim", "repeats") + (("simulate",) if args.simulate is not None else ()):
        value = getattr(args, name)
        if value < 1:
            p.error(f"--{name.replace('_', '-')} is {value}; expected an int >= 1")
    for f in args.split_fraction:
        if not 0 < f < math.inf:
            p.error(f"--split-fraction {f:g} is out of range; expected a number > 0 (of one rank's share of the work)")
    if not 0 <= args.area_cost < math.inf:
        p.error(f"--area-cost {args.area_cost:g} is out of range; expected a finite number >= 0")
    if args.profile and (args.check or args.device != "cuda"):
        p.error(f"--profile {args.profile} profiles the GPU's kernels of --simulate on --device cuda; "
                "drop it, or run --simulate N --device cuda")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    for name in ("spread", "align"):
        if args.check and len(getattr(args, name)) > 1:
            p.error(f"--{name} {' '.join(map(str, getattr(args, name)))}: --check takes one; run it once for each")
    for a in args.align:
        if a < 1:
            p.error(f"--align {a} is out of range; expected an int >= 1 (1 cuts at any token)")
    try:
        if args.check:
            if "WORLD_SIZE" not in os.environ:
                p.error(f"--check runs under torchrun: torchrun --nproc-per-node N -m benchmarks.cp --device {args.device} --check")
            if args.device == "cuda":
                if not torch.cuda.is_available():
                    p.error("--check --device cuda, but no CUDA device is visible; use --device cpu (fp64, gloo)")
                exit_after_distributed(check_cuda(args, p))
            exit_after_distributed(check(args, p))
        return simulate(args, p)
    except ValueError as e:
        return p.fail(e)


if __name__ == "__main__":
    sys.exit(main())
