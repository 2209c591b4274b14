"""Exact attention for a context-parallel shard: each local chunk attends to its whole document
prefix, with the keys and values of cut documents all-gathered across the group.

Queries stay on their rank. The keys and values of the cut blocks (the first
``layout.split_len(rank)`` tokens of every rank) are all-gathered once per call; a rank's whole
blocks read only their own keys. Each chunk attends, causal, its block from the start to the
chunk's end, bottom-right aligned (query i of a chunk of Lq sees keys j <= i + Lk - Lq);
bidirectional, the whole block. Nothing is merged across ranks, so there is no
partial softmax to combine and the result is the one the whole row gives. The backward of the
all-gather sums each rank's key and value gradients back to their owner (a reduce-scatter on NCCL;
on gloo, which has none, an all-reduce and a slice). A shard made with ``regather=True`` keeps only
its own q, k and v for the backward, which gathers the keys and values again and recomputes the
attention's forward: the gathered keys' memory in every layer, for one more forward.

A varlen kernel runs the whole blocks on the local q, k and v as they are, and the cut blocks'
chunks on their keys picked once from the gathered tokens (:class:`~packing.context.shard.KernelCalls`).
Without one, the chunks are attended gathered into a (chunks, H, longest, D) block with a mask, on
any device: exact, with memory chunks x longest query x longest key.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import Tensor

from packing.batch import Batch
from packing.boundaries import block_rows, to_blocks
from packing.context.shard import ContextShard, local_index
from packing.kernels import ChunkVarlen


class _AllGather(torch.autograd.Function):
    """(P, ...) on each rank -> (world x P, ...) in rank order; backward sums the gradients of each
    rank's slice onto that rank."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(grad.shape[0] // world, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total.chunk(world)[rank].clone(), None


class _Pick(torch.autograd.Function):
    """``x.index_select(0, index)`` for an ``index`` that names each row at most once: the backward
    writes the gradient's rows into place (a copy) where index_select's adds them (atomics)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        return out.index_copy_(0, index, grad), None


class _PickKeys(torch.autograd.Function):
    """Each cut call's keys and values, picked from the all-gathered tokens straight into their own
    contiguous tensors: ``gathered`` (G, H_kv, Dk + Dv) and one (K_c,) index a call, each naming a
    row at most once -> (k_1, v_1, k_2, v_2, ...), k_c (K_c, H_kv, Dk) and v_c (K_c, H_kv, Dv). A
    row may appear in several calls (a head's keys are a prefix of its tail's), so the backward
    adds each call's gradient into place: the first one copied, the next ones read, added and
    written back, in call order (deterministic, no atomics)."""

    @staticmethod
    def forward(ctx, gathered: Tensor, key_dim: int, *indices: Tensor):
        ctx.save_for_backward(*indices)
        ctx.shape, ctx.key_dim = gathered.shape, key_dim
        k, v = gathered[..., :key_dim], gathered[..., key_dim:]
        return tuple(t.index_select(0, index) for index in indices for t in (k, v))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        indices = ctx.saved_tensors
        first = next((g for g in grads if g is not None), None)
        if first is None:
            return (None, None, *(None for _ in indices))
        out = first.new_zeros(ctx.shape)
        written = [False, False]  # whether a call has written the keys' (0) or the values' (1) features
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            part = out[..., :ctx.key_dim] if i % 2 == 0 else out[..., ctx.key_dim:]
            index = indices[i // 2]
            part.index_copy_(0, index, part.index_select(0, index) + grad if written[i % 2] else grad)
            written[i % 2] = True
        return (out, None, *(None for _ in indices))


def gather_keys(k: Tensor, v: Tensor, shard: ContextShard, group=None) -> Tensor | None:
    """The keys and values this rank reads from others: k (T_local, H_kv, Dk) and v (T_local, H_kv,
    Dv) -> (G, H_kv, Dk + Dv), every rank's cut-block tokens (its first ``layout.split_len(rank)``
    local tokens) all-gathered in rank order, each rank's part padded to ``gather_len`` (G =
    world_size x gather_len); None when no block is cut. Only the cut-block tokens travel: a rank's
    whole blocks read their own keys."""
    world = shard.layout.world_size
    if world == 1 or not shard.gather_len:
        return None
    own = shard.layout.split_len(shard.rank)
    mine = torch.cat([k[:own], v[:own]], dim=-1)  # one collective for both
    mine = F.pad(mine, (0, 0, 0, 0, 0, shard.gather_len - own))
    return _AllGather.apply(mine, group)


def simulated_keys(k_row: Tensor, v_row: Tensor, shard: ContextShard) -> Tensor | None:
    """What :func:`gather_keys` gives rank ``shard.rank``, made in one process from the whole row's
    k (T, H_kv, Dk) and v (T, H_kv, Dv): for running every rank's attention on one device, one after
    another (``python -m benchmarks.cp --simulate``), and for tests without a process group."""
    layout = shard.layout
    if layout.world_size == 1 or not shard.gather_len:
        return None
    row = torch.cat([k_row, v_row], dim=-1)
    parts = []
    for r in range(layout.world_size):
        mine = row.index_select(0, local_index(layout, r)[: layout.split_len(r)].to(row.device))
        parts.append(F.pad(mine, (0, 0, 0, 0, 0, shard.gather_len - mine.shape[0])))
    return torch.cat(parts)


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
    def gather_and_attend(q: Tensor, k: Tensor, v: Tensor):
        return attend_chunks(q, k, v, gather_keys(k, v, shard, group), shard, causal=causal, scale=scale,
                             window=window, softcap=softcap, sinks=sinks, return_lse=return_lse, kernel=kernel)

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
    :func:`gather_keys` or :func:`simulated_keys` (keys in the first Dk features, values in the
    rest; None when no block is cut). Each chunk attends its keys bottom-right causal (or all of
    them).

    ``window``: causal only, a query sees the ``window`` latest keys of its document, itself
    included (transformers' ``sliding_window``). ``softcap``: logits capped as
    ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2). ``sinks``: (H,) one logit a
    head, in every query's softmax and attending nothing (gpt-oss' learned sinks); each chunk
    attends its whole document prefix in one softmax, so a sink is counted once a query, as in the
    whole row. With sinks, ``return_lse`` counts the sink in the log-sum-exp.

    ``kernel``: a varlen kernel taking the chunks' query and key boundaries apart
    (:func:`packing.context.varlen.chunk_kernel` gives a checked one), run as the shard's
    :class:`~packing.context.shard.KernelCalls` say: the whole blocks on q, k and v as they are,
    the cut blocks' chunks on their keys picked from ``gathered``. None: SDPA over the chunks
    gathered into a (chunks, H, longest query, longest key) block with a mask, on any device (the
    softmax written out where there is a softcap)."""
    shard = _context_of(shard)
    if window is not None and (not causal or isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window is {window!r} with causal={causal}; a sliding window is a positive int of keys, "
                         "and causal")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap is {softcap!r}; expected a positive number or None")
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks has shape {tuple(sinks.shape)}; context-parallel attention takes one sink logit a head, "
                         f"({q.shape[1]},): per-token sinks are not computed under context parallelism")
    key_dim = k.shape[-1]
    if kernel is not None:
        if return_lse:
            raise ValueError("return_lse is computed on the masked path only (kernel=None)")
        options = {name: value for name, value in (("window", window), ("softcap", softcap), ("sinks", sinks))
                   if value is not None}
        calls = shard.kernel_calls[causal]
        own = shard.layout.split_len(shard.rank)
        outs = []
        if calls.q_index:  # the cut blocks' chunks: each call's keys picked from the gathered tokens
            picked = _PickKeys.apply(gathered, key_dim, *calls.keys)  # k_1, v_1, k_2, v_2, ...
            start = 0
            for k_call, v_call, rows, cu_q, cu_k, max_q, max_k in zip(picked[0::2], picked[1::2], calls.q_index,
                                                                      calls.cu_q, calls.cu_k, calls.max_q, calls.max_k):
                # in order: this call's queries are the next rows of the local row, a slice (no copy)
                q_call = q[start:start + rows.shape[0]] if calls.in_order else _Pick.apply(q, rows)
                outs.append(kernel(q_call, k_call, v_call, cu_q, cu_k, max_q, max_k, causal, scale=scale, **options))
                start += rows.shape[0]
            if not calls.in_order:
                outs = [_Pick.apply(torch.cat(outs), calls.order)]
        if calls.whole_cu is not None:  # the whole blocks: the local rows after the cut ones, as they are
            outs.append(kernel(q[own:], k[own:], v[own:], calls.whole_cu, calls.whole_cu, calls.whole_max,
                               calls.whole_max, causal, scale=scale, **options))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    local = torch.cat([k, v], dim=-1)
    source = local if gathered is None else torch.cat([gathered, local])  # what key_index indexes
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
