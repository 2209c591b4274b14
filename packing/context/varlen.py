"""The varlen kernel a context-parallel shard runs its chunks with, checked before first use.

A shard's chunk is part of a document: its queries attend the document's keys up to the chunk's
end, so the kernel takes the keys' boundaries apart from the queries' and must align causal masks
bottom-right (query i of a chunk of Lq queries sees keys j <= i + Lk - Lq). Every kernel of
:func:`packing.kernels.chunk_varlen_kernels` is documented to; a build that aligns top-left, or
reads one set of boundaries for both, would train silently wrong. So before a kernel's first use
on a device, dtype and head dimension, :func:`chunk_kernel` runs it on a small shard (a document
cut across two ranks, grouped-query heads), forward and backward, against the softmax written out
in fp64, and refuses it when its error is more than 4x the error of the masked path (SDPA, or the
softmax written out for a softcap) in the same dtype, with a floor of 1e-5. Verdicts are cached for the process.

Examples:
    A kernel that aligns the causal mask top-left is refused (any kernel callable can be checked):

    >>> import torch
    >>> def top_left(q, k, v, cu_q, cu_k, max_q, max_k, causal, *, scale=None):
    ...     outs = []
    ...     for i in range(len(cu_q) - 1):
    ...         qi, ki, vi = (t[a:b].transpose(0, 1) for t, a, b in ((q, cu_q[i], cu_q[i + 1]),
    ...                       (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
    ...         ki, vi = (x.repeat_interleave(qi.shape[0] // x.shape[0], 0) for x in (ki, vi))
    ...         mask = torch.ones(qi.shape[1], ki.shape[1], dtype=torch.bool).tril()
    ...         outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
    ...     return torch.cat(outs)
    >>> check_kernel("top-left", top_left, torch.device("cpu"), torch.float32, 16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the varlen kernel 'top-left' is not exact for a context-parallel chunk ...
"""

from __future__ import annotations

import functools

import torch

from packing.kernels import ChunkVarlen, chunk_varlen_kernels, takes_head_dim, varlen_options

_verdicts: dict[tuple, float] = {}  # (kernel, device type, dtype, head_dim) -> the measured error, once passed
TOLERANCE_FACTOR, FLOOR = 4.0, 1e-5


# The option values a check runs with: a window shorter than the check's documents, a softcap that
# bends the logits, a scale other than 1/sqrt(D), sink logits (one a head of the check's 4) that
# take a sizeable share of the softmax.
CHECK_OPTIONS = {"window": 7, "softcap": 2.0, "scale": 0.3, "sinks": (-1.0, 0.0, 0.5, 2.0)}


# Once per process for each device, dtype, head dimension, kernel list and options: it is asked in
# every layer of every step, and finding the kernels reads their packages' signatures.
@functools.cache
def chunk_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, names: tuple[str, ...] | None = None,
                 options: frozenset[str] = frozenset()) -> tuple[str, ChunkVarlen] | None:
    """The first kernel of :func:`~packing.kernels.chunk_varlen_kernels` (of ``names`` only, in
    that order, when given) that loads, computes ``head_dim`` (:func:`~packing.kernels.takes_head_dim`)
    and every option of ``options`` (``window``, ``softcap``, ``scale``, ``sinks``), and passes
    :func:`check_kernel` here with them; None when none does.
    A kernel that loads and fails its check raises: it is never skipped silently."""
    found = chunk_varlen_kernels()
    for name in names if names is not None else tuple(found):
        if name in found and options <= varlen_options(name) and takes_head_dim(name, head_dim):
            check_kernel(name, found[name], device, dtype, head_dim, options)
            return name, found[name]
    return None


def check_kernel(name: str, kernel: ChunkVarlen, device: torch.device, dtype: torch.dtype, head_dim: int,
                 options: frozenset[str] = frozenset()) -> float:
    """Run ``kernel`` on a small shard against the softmax written out in fp64, forward and backward,
    with the ``options`` a layer asks for (at :data:`CHECK_OPTIONS`' values); return its relative
    error, or raise ``ValueError`` naming the kernel and both errors."""
    key = (name, device.type, dtype, head_dim, frozenset(options))
    asked = {o: CHECK_OPTIONS[o] for o in options}
    if key in _verdicts:
        return _verdicts[key]
    from packing import get_collator
    from packing.context.attention import attend_chunks, simulated_keys
    from packing.context.layout import plan_layout
    from packing.context.shard import batch_blocks, local_index, shard

    g = torch.Generator().manual_seed(0)
    batch = get_collator("concat")([[0] * n for n in (37, 5, 1, 23)])
    layout = plan_layout(batch_blocks(batch), 2, split_tokens=8)  # 37 and 23 cut head-and-tail across 2 ranks
    q_row, k_row, v_row = (torch.randn(batch.num_slots, h, head_dim, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    d_out = torch.randn(batch.num_slots, 4, head_dim, generator=g, dtype=torch.float64)
    worst = {"kernel": 0.0, "sdpa": 0.0}
    for causal in (True, False) if "window" not in asked else (True,):
        for r in range(2):
            part = shard(batch, layout, r).to(device)
            idx = local_index(layout, r)
            runs = {}
            for how, run_dtype, use in (("reference", torch.float64, None), ("sdpa", dtype, None), ("kernel", dtype, kernel)):
                q = q_row[idx].to(device, run_dtype).requires_grad_()
                k_dev, v_dev = (t.to(device, run_dtype, copy=True).requires_grad_() for t in (k_row, v_row))
                k, v = k_dev[idx.to(device)], v_dev[idx.to(device)]
                gathered = simulated_keys(k_dev, v_dev, part.context)
                leaves = [q, k_dev, v_dev]
                run_options = dict(asked)
                if "sinks" in asked:  # a learned parameter: its gradient is checked too
                    run_options["sinks"] = torch.tensor(asked["sinks"], device=device, dtype=run_dtype, requires_grad=True)
                    leaves.append(run_options["sinks"])
                if how == "reference":  # the softmax written out
                    out = attend_chunks(q, k, v, gathered, part, causal=causal, return_lse=True, **run_options)[0]
                else:
                    out = attend_chunks(q, k, v, gathered, part, causal=causal, kernel=use, **run_options)
                out.backward(d_out[idx].to(device, run_dtype))
                # a kernel that ignores an input leaves its gradient None: zeros, which the check refuses
                grads = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]
                runs[how] = [t.double().cpu() for t in (out.detach(), *grads)]
            for how in ("sdpa", "kernel"):
                for got, ref in zip(runs[how], runs["reference"]):
                    worst[how] = max(worst[how], ((got - ref).norm() / ref.norm()).item())
    if not worst["kernel"] <= max(TOLERANCE_FACTOR * worst["sdpa"], FLOOR):
        with_options = f" with {', '.join(sorted(options))}" if options else ""
        raise ValueError(f"the varlen kernel {name!r} is not exact for a context-parallel chunk on {device.type} in "
                         f"{str(dtype).removeprefix('torch.')} at head dim {head_dim}{with_options}: relative error "
                         f"{worst['kernel']:.2e} against fp64, where the masked path in the same dtype is off by {worst['sdpa']:.2e} "
                         "(a chunk's causal mask must be aligned bottom-right, its keys' boundaries read apart from "
                         "its queries'); use another kernel or the masked path (kernel=None)")
    _verdicts[key] = worst["kernel"]
    return worst["kernel"]
