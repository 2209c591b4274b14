"""Exact attention for a context-parallel shard: each local chunk attends to its whole document
prefix, with the keys and values of cut documents all-gathered across the group.

Queries stay on their rank. The keys and values of the cut blocks (the first
``layout.split_len(rank)`` tokens of every rank, each rank's own count, none padded) are
all-gathered once per call; a rank's whole blocks read only their own keys. Each chunk attends, causal, its block from the start to the
chunk's end, bottom-right aligned (query i of a chunk of Lq sees keys j <= i + Lk - Lq);
bidirectional, the whole block. Nothing is merged across ranks, so there is no
partial softmax to combine and the result is the one the whole row gives. The backward of the
all-gather sums each rank's key and value gradients back to their owner (a reduce-scatter on NCCL;
on gloo, an all-reduce and a slice). A shard made with ``regather=True`` keeps only
its own q, k and v for the backward, which gathers the keys and values again and recomputes the
attention's forward: the gathered keys' memory in every layer, for one more forward.

A varlen kernel runs all of a rank's chunks in one call (:class:`~packing.context.shard.KernelCall`):
q as it is, the cut chunks' keys copied from the gathered tokens and the whole blocks' keys after
them. Without one, the chunks are attended gathered into a (chunks, H, longest, D) block with a
mask, on any device: exact, with memory chunks x longest query x longest key.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import Tensor

from packing.batch import Batch
from packing.boundaries import block_rows, to_blocks
from packing.context.shard import ContextShard, KernelCall, local_index
from packing.kernels import ChunkVarlen


# The one-buffer collectives under their newer names where torch has them (the older ones warn
# from torch 2.13 on).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """Rank r's x (sizes[r],) -> (sum(sizes),): every rank's x, in rank order. ``sizes`` (host
    ints, the same on every rank) may differ, and nothing is padded: NCCL gathers unequal parts as
    grouped broadcasts, gloo as one broadcast a part. The backward sums each part's gradient over
    the ranks onto its owner (a reduce-scatter on NCCL; on gloo, an all-reduce and a slice)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], group) -> Tensor:
        nccl, even = dist.get_backend(group) == "nccl", len(set(sizes)) == 1
        ctx.sizes, ctx.group, ctx.nccl, ctx.even = sizes, group, nccl, even
        x = x.contiguous()
        out = x.new_empty(sum(sizes))
        if nccl and even:  # straight into one buffer, no copy after
            _all_gather_single(out, x, group=group)
            return out
        parts = list(out.split(sizes))
        if nccl or even:
            dist.all_gather(parts, x, group=group)
        else:  # gloo's all_gather takes equal parts only
            parts[dist.get_rank(group)].copy_(x)
            for r, part in enumerate(parts):
                if sizes[r]:
                    dist.broadcast(part, group=group, group_src=r)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        rank, sizes = dist.get_rank(ctx.group), ctx.sizes
        grad = grad.contiguous()
        if ctx.nccl:
            out = grad.new_empty(sizes[rank])
            if ctx.even:
                _reduce_scatter_single(out, grad, group=ctx.group)
            else:
                dist.reduce_scatter(out, list(grad.split(sizes)), group=ctx.group)
            return out, None, None
        total = grad.clone()  # gloo has no reduce-scatter on every torch we run on
        dist.all_reduce(total, group=ctx.group)
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]].clone(), None, None


class _CallKeys(torch.autograd.Function):
    """The keys and values of a shard's one kernel call (:class:`~packing.context.shard.KernelCall`):
    the cut chunks' keys copied from the gathered tokens, piece by piece in the call's order, then
    the whole blocks' keys. ``gathered`` (G x H_kv x (Dk + Dv),), rank by rank its keys then its
    values (:func:`gather_keys`); ``k_whole`` (W, H_kv, Dk) and ``v_whole`` (W, H_kv, Dv)
    -> k (K, H_kv, Dk) and v (K, H_kv, Dv). The backward adds the gradients of a piece's copies (one
    add a stretch of pieces read together) and writes every rank's pieces back into the gathered
    layout, zeros for pieces the call does not read: one concatenation each for keys and values a
    rank, no index kernel and no atomics."""

    @staticmethod
    def forward(ctx, gathered: Tensor, k_whole: Tensor, v_whole: Tensor, call: KernelCall) -> tuple[Tensor, Tensor]:
        ctx.call, ctx.shapes = call, (k_whole.shape[1:], v_whole.shape[1:])
        if not call.reads:
            return k_whole, v_whole
        k_pieces, v_pieces = _pieces(gathered, call, *ctx.shapes)
        k = torch.cat([k_pieces[p] for p in call.reads] + [k_whole])
        v = torch.cat([v_pieces[p] for p in call.reads] + [v_whole])
        return k, v

    @staticmethod
    def backward(ctx, dk: Tensor, dv: Tensor):
        call, (k_shape, v_shape) = ctx.call, ctx.shapes
        cut, numel = call.cut_keys, sum(call.sizes) * (k_shape.numel() + v_shape.numel())
        if not call.reads:  # zeros, so that this rank still joins the all-gather's backward
            return dk.new_zeros(numel), dk, dv, None
        gathered = dk.new_empty(numel)
        halves = _halves(gathered, call, k_shape, v_shape)
        dk, dv = dk.contiguous(), dv.contiguous()
        for part, (d, shape) in enumerate(((dk, k_shape), (dv, v_shape))):
            grads = _piece_grads(d[:cut], call, shape)
            first = 0
            for rank, half in zip(call.pieces, halves):
                if rank:  # a rank with no cut chunk sends nothing
                    torch.cat(grads[first:first + len(rank)], out=half[part])
                first += len(rank)
        return gathered, dk[cut:], dv[cut:], None


def call_keys(gathered: Tensor | None, k_whole: Tensor, v_whole: Tensor, call: KernelCall) -> tuple[Tensor, Tensor]:
    """The keys (K, H_kv, Dk) and values (K, H_kv, Dv) of ``call``: the cut chunks' copied from
    ``gathered`` (:func:`gather_keys`), then ``k_whole`` and ``v_whole``, the whole blocks' local
    rows; these alone, not copied, when the call reads nothing gathered. A rank whose chunks read
    nothing gathered (its blocks all whole, others cut) still passes ``gathered`` through, so its
    backward joins the all-gather's: a collective every rank of the group must call."""
    return (k_whole, v_whole) if gathered is None else _CallKeys.apply(gathered, k_whole, v_whole, call)


def _piece_grads(d: Tensor, call: KernelCall, shape: torch.Size) -> list[Tensor]:
    """Each piece's gradient from ``d`` (cut keys, H_kv, D), the gradient of the call's cut keys:
    its one read's, the sum of its reads', or zeros."""
    reads = d.split([call.sizes[p] for p in call.reads])
    sums = []
    for starts, lengths in call.sums:
        length = sum(lengths)
        total = d[starts[0]:starts[0] + length] + d[starts[1]:starts[1] + length]
        for start in starts[2:]:
            total += d[start:start + length]
        sums.append(total.split(list(lengths)))
    zeros = d.new_zeros(max(call.sizes), *shape)
    return [zeros[:n] if kind == 0 else reads[i] if kind == 1 else sums[kind - 2][i]
            for (kind, i), n in zip(call.grads, call.sizes)]


def _halves(gathered: Tensor, call: KernelCall, k_shape: torch.Size, v_shape: torch.Size) -> list[tuple[Tensor, Tensor]]:
    """Each rank's part of ``gathered`` (G x H_kv x (Dk + Dv),) as its keys (n_r, H_kv, Dk) and
    values (n_r, H_kv, Dv), n_r its cut-block tokens: views."""
    counts = [sum(rank) for rank in call.pieces]
    parts = gathered.split([n * (k_shape.numel() + v_shape.numel()) for n in counts])
    return [tuple(t.view(n, *shape) for t, shape in zip(part.split([n * k_shape.numel(), n * v_shape.numel()]),
                                                        (k_shape, v_shape)))
            for n, part in zip(counts, parts)]


def _pieces(gathered: Tensor, call: KernelCall, k_shape: torch.Size, v_shape: torch.Size):
    """Every piece of ``gathered`` as keys (n, H_kv, Dk) and values (n, H_kv, Dv), views in piece
    order."""
    k_pieces, v_pieces = [], []
    for rank, (k, v) in zip(call.pieces, _halves(gathered, call, k_shape, v_shape)):
        k_pieces += k.split(list(rank))
        v_pieces += v.split(list(rank))
    return k_pieces, v_pieces


def gather_keys(k: Tensor, v: Tensor, shard: ContextShard, group=None) -> Tensor | None:
    """The keys and values this rank reads from others: k (T_local, H_kv, Dk) and v (T_local, H_kv,
    Dv) -> (G x H_kv x (Dk + Dv),), G = ``layout.gather_tokens``: rank by rank, its cut-block
    tokens (its first ``layout.split_len(r)`` local tokens), their keys then their values, flat;
    None when no block is cut. Only the cut-block tokens travel, each rank's own count: a rank's
    whole blocks read their own keys."""
    own = shard.layout.split_len(shard.rank)
    return _gather(k[:own], v[:own], shard, group)


def _gather(k_cut: Tensor, v_cut: Tensor, shard: ContextShard, group) -> Tensor | None:
    layout = shard.layout
    if layout.world_size == 1 or not layout.gather_tokens:
        return None
    per_token = k_cut.shape[1:].numel() + v_cut.shape[1:].numel()
    sizes = tuple(layout.split_len(r) * per_token for r in range(layout.world_size))
    return _AllGather.apply(_row(k_cut, v_cut), sizes, group)


def _row(k: Tensor, v: Tensor) -> Tensor:
    """One rank's part of the gathered tokens: its cut keys, then values, flat."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def simulated_keys(k_row: Tensor, v_row: Tensor, shard: ContextShard) -> Tensor | None:
    """What :func:`gather_keys` gives rank ``shard.rank``, made in one process from the whole row's
    k (T, H_kv, Dk) and v (T, H_kv, Dv): for running every rank's attention on one device, one after
    another (``python -m benchmarks.cp --simulate``), and for tests without a process group."""
    layout = shard.layout
    if layout.world_size == 1 or not layout.gather_tokens:
        return None
    rows = []
    for r in range(layout.world_size):
        index = local_index(layout, r)[: layout.split_len(r)].to(k_row.device)
        rows.append(_row(k_row.index_select(0, index), v_row.index_select(0, index)))
    return torch.cat(rows)


# Outside torch.compile: a shard's chunks are host ints (the layout), and traced they would be
# guards, one compilation per row. Run eagerly, the attention is a graph break in each layer, and
# the layers around it see only the shard's token count, which turns dynamic after one recompile.
@torch.compiler.disable
def context_attention(q: Tensor, k: Tensor, v: Tensor, shard: ContextShard | Batch, *, causal: bool, group=None,
                      scale: float | None = None, window: int | None = None, softcap: float | None = None,
                      sinks: Tensor | None = None, return_lse: bool = False,
                      kernel: ChunkVarlen | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of a shard's tokens: q (T_local, H, D), k and v (T_local, H_kv, D) with H a multiple
    of H_kv -> (T_local, H, D), the rows of the whole row's per-document attention at this rank's
    tokens. ``shard`` is the shard's ``batch.context`` (or the shard itself); ``group`` the
    context-parallel process group (the default group when None), whose size and rank must be the
    layout's; ``scale`` the softmax scale (None: 1/sqrt(D)). ``return_lse``: also return each
    query's log-sum-exp of its scaled logits, (T_local, H) float (computed explicitly: for checks).
    ``window``, ``softcap``, ``sinks`` and ``kernel``: see :func:`attend_chunks`."""
    shard = _context_of(shard)
    layout = shard.layout
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if (world, rank) != (layout.world_size, shard.rank):
        raise ValueError(f"the shard is rank {shard.rank} of {layout.world_size}, and this process is rank {rank} of a "
                         f"context-parallel group of {world}: shard for this group")
    own = layout.split_len(rank)

    def gather_and_attend(q: Tensor, k: Tensor, v: Tensor):
        k_parts, v_parts = _split(k, own), _split(v, own)  # one split each: one concatenation in the backward
        gathered = _gather(k_parts[0], v_parts[0], shard, group)
        return _attend(q, k_parts, v_parts, gathered, shard, causal=causal, scale=scale, window=window, softcap=softcap,
                       sinks=sinks, return_lse=return_lse, kernel=kernel)

    if shard.regather and torch.is_grad_enabled():
        # Nothing but q, k and v is kept: the backward runs the gather (a collective, in the same
        # order on every rank, as the backward is) and the attention's forward again.
        return checkpoint(gather_and_attend, q, k, v, use_reentrant=False, preserve_rng_state=False)
    return gather_and_attend(q, k, v)


def _context_of(shard: ContextShard | Batch) -> ContextShard:
    if isinstance(shard, Batch):
        if shard.context is None:
            raise ValueError("context_attention needs a context-parallel shard (batch.context); this batch is a whole row")
        return shard.context
    return shard


def attend_chunks(q: Tensor, k: Tensor, v: Tensor, gathered: Tensor | None, shard: ContextShard | Batch, *,
                  causal: bool, scale: float | None = None, window: int | None = None, softcap: float | None = None,
                  sinks: Tensor | None = None, return_lse: bool = False,
                  kernel: ChunkVarlen | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The local part of :func:`context_attention`: q (T_local, H, D), k (T_local, H_kv, Dk) and v
    (T_local, H_kv, Dv), this rank's own, and ``gathered``, the cut blocks' keys and values of
    :func:`gather_keys` or :func:`simulated_keys` (None when no block is cut). Each chunk attends
    its keys bottom-right causal (or all of them).

    ``window``: causal only, a query sees the ``window`` latest keys of its document, itself
    included (transformers' ``sliding_window``). ``softcap``: logits capped as
    ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2). ``sinks``: (H,) one logit a
    head, in every query's softmax and attending nothing (gpt-oss' learned sinks); each chunk
    attends its whole document prefix in one softmax, so a sink is counted once a query, as in the
    whole row. With sinks, ``return_lse`` counts the sink in the log-sum-exp.

    ``kernel``: a varlen kernel taking the chunks' query and key boundaries apart
    (:func:`packing.context.varlen.chunk_kernel` gives a checked one), called once as the shard's
    :class:`~packing.context.shard.KernelCall` says: every chunk a sequence, q as it is, the cut
    chunks' keys copied from ``gathered`` and the whole blocks' keys after them. None: SDPA over the chunks
    gathered into a (chunks, H, longest query, longest key) block with a mask, on any device (the
    softmax written out where there is a softcap)."""
    shard = _context_of(shard)
    own = shard.layout.split_len(shard.rank)
    return _attend(q, _split(k, own), _split(v, own), gathered, shard, causal=causal, scale=scale, window=window,
                   softcap=softcap, sinks=sinks, return_lse=return_lse, kernel=kernel)


def _split(x: Tensor, own: int) -> tuple[Tensor, Tensor]:
    """(the cut blocks' rows, the whole blocks' rows) of a local x: views, the whole x as it is when
    nothing is cut."""
    return (x[:0], x) if own == 0 else x.split([own, x.shape[0] - own])


def _attend(q: Tensor, k_parts: tuple[Tensor, Tensor], v_parts: tuple[Tensor, Tensor], gathered: Tensor | None,
            shard: ContextShard, *, causal: bool, scale: float | None, window: int | None, softcap: float | None,
            sinks: Tensor | None, return_lse: bool, kernel: ChunkVarlen | None) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`attend_chunks` with k and v already cut into (cut rows, whole rows) by :func:`_split`."""
    if window is not None and (not causal or isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window is {window!r} with causal={causal}; a sliding window is a positive int of keys, "
                         "and causal")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap is {softcap!r}; expected a positive number or None")
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks has shape {tuple(sinks.shape)}; context-parallel attention takes one sink logit a head, "
                         f"({q.shape[1]},): per-token sinks are not computed under context parallelism")
    (k_cut, k_whole), (v_cut, v_whole) = k_parts, v_parts
    if kernel is not None:
        if return_lse:
            raise ValueError("return_lse is computed on the masked path only (kernel=None)")
        options = {name: value for name, value in (("window", window), ("softcap", softcap), ("sinks", sinks))
                   if value is not None}
        call = shard.kernel_call[causal]
        k, v = call_keys(gathered, k_whole, v_whole, call)
        return kernel(q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, causal, scale=scale, **options)
    key_dim = k_whole.shape[-1]
    local = torch.cat([torch.cat([k_cut, v_cut], dim=-1), torch.cat([k_whole, v_whole], dim=-1)])
    if gathered is not None:  # what key_index indexes: the gathered tokens as rows, then the local ones
        halves = _halves(gathered, shard.kernel_call[causal], k_whole.shape[1:], v_whole.shape[1:])
        rows = torch.cat([torch.cat(half, dim=-1) for half in halves])
        local = torch.cat([rows, local])
    source = local
    keys = source.index_select(0, shard.key_index[causal])  # (K, H_kv, Dk + Dv): each chunk's keys in order
    k_row, v_row = keys.split([key_dim, source.shape[-1] - key_dim], dim=-1)
    chunks = shard.layout.chunks[shard.rank]
    q_lens = [c.length for c in chunks]
    k_lens = [(c.end if causal else c.block_end) - c.block_start for c in chunks]
    n, lq, lk = len(chunks), max(q_lens), max(k_lens)
    q_slot = block_rows(torch.tensor(q_lens), lq).to(q.device)
    k_slot = block_rows(torch.tensor(k_lens), lk).to(q.device)
    qb = to_blocks(q, q_slot, n, lq)  # (C, H, Lq, D)
    kb, vb = to_blocks(k_row, k_slot, n, lk), to_blocks(v_row, k_slot, n, lk)  # (C, H_kv, Lk, D)

    i = torch.arange(lq, device=q.device)[None, :, None]  # query slot
    j = torch.arange(lk, device=q.device)[None, None, :]  # key slot
    qn = torch.tensor(q_lens, device=q.device)[:, None, None]
    kn = torch.tensor(k_lens, device=q.device)[:, None, None]
    allowed = j < kn
    if causal:
        allowed = allowed & (j <= i + (kn - qn))  # bottom-right: a chunk's last query sees its last key
    if window is not None:  # query i sits at key slot i + kn - qn of its document's keys
        allowed = allowed & (i + (kn - qn) - j < window)
    allowed = allowed | ((i >= qn) & (j == 0))  # a padding query row sees key 0: no empty softmax row
    heads = q.shape[1]

    def tokens(x: Tensor) -> Tensor:  # (C, H, Lq, X) -> (T_local, H, X)
        return x.transpose(1, 2).reshape(n * lq, heads, x.shape[-1]).index_select(0, q_slot)

    if not return_lse and softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None], scale=scale,
                                             enable_gqa=kb.shape[1] != heads)  # (C, H, Lq, Dv)
        return tokens(out)
    group_size = heads // kb.shape[1]
    kb, vb = kb.repeat_interleave(group_size, 1), vb.repeat_interleave(group_size, 1)
    logits = (qb @ kb.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (C, H, Lq, Lk)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, H, Lq, 1)
    if sinks is not None:  # the sink joins each query's normaliser and attends no value
        lse = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None, None])
    out = (logits - lse).exp() @ vb
    return (tokens(out), tokens(lse)[..., 0]) if return_lse else tokens(out)
