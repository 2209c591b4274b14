"""Attention kernels alone, at the seed workload's exact shape: forward and backward, per kernel.

    python -m benchmarks.attention_kernels                 # on a GPU; every kernel that loads here
    python -m benchmarks.attention_kernels --json out.json

One step of the seed workload: ``--batch-size`` seed documents (lengths uniform in [1, 1023]) as
one packed row of T tokens, 16 heads of dimension 64, bf16, causal (training) and bidirectional
(eval), the q/k/v of one layer. Each kernel computes the same attention:

- ``flash-attn-4``, ``flash-attn-2``, ``torch.varlen_attn`` (FA2 inside torch): varlen over the packed
  row, the ``flash`` adapter's kernels (:mod:`packing.kernels`);
- ``xformers`` / ``mslk``: ``memory_efficient_attention`` with a ``BlockDiagonalMask``, the
  ``xformers`` adapter's kernel;
- ``sdpa-cudnn``, ``sdpa-flash``: ``F.scaled_dot_product_attention`` restricted to one backend, on
  the same documents padded to the longest (B, H, L, D), so they also compute the padding; this is
  the only layout through which torch's SDPA reaches cuDNN.

Times are CUDA-event medians over ``--steps`` calls after ``--warmup``, forward alone and forward
plus backward (one upstream gradient); ``bwd`` is their difference. TFLOP/s counts the real work only
(4 T_i² H D per document for the forward, halved when causal; 2.5x that for the backward). The ratio
column is against ``torch.varlen_attn``, measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import Parser, environment, format_table, non_negative, positive, resolve_device, time_steps, write_json
from models.kernels import fmha_backend
from packing.kernels import varlen_kernels
from packing import SyntheticDocs
from packing.boundaries import cumulative_lengths

BASELINE = "torch.varlen_attn"
HEADS, HEAD_DIM = 16, 64  # the seed model's; --heads / --head-dim for other shapes (Qwen3: 16 of 128)


@dataclass
class KernelRecord:
    kernel: str
    layout: str  # "packed" or "padded"
    causal: bool
    tokens: int  # real tokens in the step
    slots: int  # positions the kernel computes
    fwd_ms: float
    fwd_bwd_ms: float
    bwd_ms: float
    fwd_tflops: float
    bwd_tflops: float
    device: str
    gpu: str | None
    torch: str
    kernels: dict[str, str]  # the optional kernel packages that loaded (packing.kernels.loaded)
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    status: str = "ok"  # or why the kernel could not run this case
    command: str = ""
    speedup_fwd_bwd_vs_baseline: float | None = None


def kernels(lens: list[int], device: torch.device) -> dict[str, tuple[str, Callable]]:
    """name -> (layout, fn(q, k, v, causal) -> out) for every kernel that runs here. A "packed"
    kernel takes q, k, v as (T, H, D); a "padded" one as (B, H, L, D), which :func:`measure` makes
    with :func:`padded` before the clock starts."""
    cu = cumulative_lengths(lens).to(device)
    longest = max(lens)
    found: dict[str, tuple[str, Callable]] = {}
    for name, run in varlen_kernels().items():
        found[name] = ("packed", lambda q, k, v, causal, run=run: run(q, k, v, cu, longest, causal))
    fmha = fmha_backend()
    if fmha is not None:
        name, module = fmha
        mask = module.attn_bias.BlockDiagonalMask.from_seqlens(list(lens), device=device)
        causal_mask = mask.make_causal()
        found[name] = ("packed", lambda q, k, v, causal: module.memory_efficient_attention(
            q[None], k[None], v[None], attn_bias=causal_mask if causal else mask)[0])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def run_padded(q, k, v, causal, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        found[name] = ("padded", run_padded)
    return found


def padded(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """(T, H, D) packed -> (B, H, L, D) right-padded to the longest document, zeros in the padding."""
    rows = x.split(lens)
    out = x.new_zeros(len(lens), max(lens), *x.shape[1:])
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out.transpose(1, 2).contiguous()


def measure(name: str, layout: str, fn: Callable, lens: list[int], causal: bool, args, device) -> KernelRecord:
    g = torch.Generator(device=device).manual_seed(args.seed)
    T, heads, head_dim = sum(lens), args.heads, args.head_dim
    q, k, v, grad = (torch.randn(T, heads, head_dim, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4))
    if layout == "padded":
        q, k, v, grad = (padded(t, lens) for t in (q, k, v, grad))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            return fn(q, k, v, causal)

    def forward_backward():
        out = fn(q, k, v, causal)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        return out.detach()

    fwd = time_steps([forward] * args.warmup, [forward] * args.steps, device)
    both = time_steps([forward_backward] * args.warmup, [forward_backward] * args.steps, device)
    fwd_ms, both_ms = statistics.median(fwd.step_ms), statistics.median(both.step_ms)
    flops = sum(4 * n * n * heads * head_dim for n in lens) * (0.5 if causal else 1.0)
    slots = len(lens) * max(lens) if layout == "padded" else T
    bwd_ms = both_ms - fwd_ms
    return KernelRecord(kernel=name, layout=layout, causal=causal, tokens=T, slots=slots, fwd_ms=fwd_ms,
                        fwd_bwd_ms=both_ms, bwd_ms=bwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
                        bwd_tflops=2.5 * flops / bwd_ms / 1e9 if bwd_ms > 0 else float("nan"), heads=heads,
                        head_dim=head_dim, **environment(device))


# Every kernel this benchmark knows, whether or not it loads here: a name outside it is a typo.
KNOWN = ("flash-attn-3", "flash-attn-4", "flash-attn-2", "torch.varlen_attn", "xformers", "mslk", "sdpa-cudnn", "sdpa-flash")


def build_parser() -> Parser:
    p = Parser(prog="python -m benchmarks.attention_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cuda (the default where available); the kernels need a GPU")
    p.add_argument("--batch-size", type=positive, default=32, help="seed documents in the step (default 32)")
    p.add_argument("--steps", type=positive, default=30, help="timed calls per kernel (default 30)")
    p.add_argument("--warmup", type=non_negative, default=5, help="untimed calls first (default 5)")
    p.add_argument("--seed", type=int, default=0, help="documents and q, k, v (default 0)")
    p.add_argument("--heads", type=positive, default=HEADS, help=f"attention heads (default {HEADS})")
    p.add_argument("--head-dim", type=positive, default=HEAD_DIM, help=f"head dimension (default {HEAD_DIM}; Qwen3: 128)")
    p.add_argument("--kernels", nargs="+", metavar="NAME",
                   help=f"only these kernels, from {', '.join(KNOWN)} (default: every one that loads)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        typos = sorted(set(args.kernels or ()) - set(KNOWN))
        if typos:
            raise ValueError(f"unknown kernel {typos[0]!r} in --kernels; choose from {', '.join(KNOWN)}")
        device = resolve_device(args.device)
        if device.type != "cuda":
            raise ValueError("the attention kernels need a CUDA GPU; run this on one (--device cuda)")
        lens = [int(n) for n in SyntheticDocs(args.batch_size, max_len=1024, seed=args.seed).lengths]
        found = kernels(lens, device)
        if args.kernels:
            unknown = sorted(set(args.kernels) - set(found))
            if unknown:
                raise ValueError(f"--kernels {' '.join(unknown)} did not load here; available: {', '.join(found)}")
            found = {n: found[n] for n in args.kernels}
    except ValueError as e:
        return parser.fail(e)
    records = []
    for causal in (True, False):
        for name, (layout, fn) in found.items():
            try:
                records.append(measure(name, layout, fn, lens, causal, args, device))
            except RuntimeError as e:  # a backend that refuses this shape (SDPA says why): recorded, not fatal
                nan = float("nan")
                records.append(KernelRecord(
                    kernel=name, layout=layout, causal=causal, tokens=sum(lens), slots=0, fwd_ms=nan, fwd_bwd_ms=nan,
                    bwd_ms=nan, fwd_tflops=nan, bwd_tflops=nan, heads=args.heads, head_dim=args.head_dim,
                    **environment(device),
                    status=f"failed: {str(e).splitlines()[0][:200]}"))
    command = parser.command(argv)
    for r in records:
        r.command = command
        base = next((b for b in records if b.kernel == BASELINE and b.causal == r.causal), None)
        r.speedup_fwd_bwd_vs_baseline = None if base is None or r.status != "ok" else base.fwd_bwd_ms / r.fwd_bwd_ms
    r0 = records[0]
    print(f"gpu={r0.gpu} torch={r0.torch} documents={len(lens)} tokens={r0.tokens} longest={max(lens)} "
          f"heads={args.heads} head_dim={args.head_dim} bf16")
    print(format_table(
        ["kernel", "layout", "causal", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s", "bwd TFLOP/s", f"x {BASELINE}", "status"],
        [[r.kernel, r.layout, r.causal, f"{r.fwd_ms:.3f}", f"{r.bwd_ms:.3f}", f"{r.fwd_bwd_ms:.3f}",
          f"{r.fwd_tflops:.0f}", f"{r.bwd_tflops:.0f}",
          "-" if r.speedup_fwd_bwd_vs_baseline is None else f"{r.speedup_fwd_bwd_vs_baseline:.2f}", r.status]
         for r in records]))
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
