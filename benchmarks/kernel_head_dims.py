"""Each varlen kernel at small head dimensions, forward and backward, against the fp32 CPU path.

Why it exists: FlashAttention-4 4.0.0b36 gave the right forward at head dimension 16 on an H200 but
dq, dk and dv 83-94% off fp32 (benchmarks/results/families/2026-12-01-h200-families/probe_head_dim.txt), so
``packing.kernels.VARLEN_MIN_HEAD_DIM`` keeps it above 16. Re-run it on a new GPU or kernel
version before lowering that floor.

Usage (on a GPU): python -m benchmarks.kernel_head_dims [--head-dims 16 32 64]
"""

from __future__ import annotations

import argparse
import sys

import torch


def probe(head_dims=(16, 32, 64)) -> list[str]:
    """One line a (head dimension, kernel): the relative errors of out, dq, dk and dv against fp32."""
    from packing.interop import hf_attention
    from packing.kernels import varlen_kernels
    from packing.interop.hf_attention import LayerOptions
    from packing.boundaries import cumulative_lengths

    g = torch.Generator().manual_seed(0)
    cu = cumulative_lengths([40, 3, 77, 8])
    lines = []
    for dim in head_dims:
        q, k, v = (torch.randn(128, h, dim, generator=g).requires_grad_() for h in (4, 2, 2))
        weight = torch.randn(128, 4, dim, generator=g)
        ref = hf_attention._masked(q, k, v, cu, 77, LayerOptions(causal=True))
        ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
        for name, run in varlen_kernels().items():
            try:
                x = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v)]
                out = run(*x, cu.cuda(), 77, True)
                grads = torch.autograd.grad((out.float() * weight.cuda()).sum(), x)
            except Exception as e:  # noqa: BLE001 - a refusal is a result too
                lines.append(f"D={dim} {name}: {type(e).__name__}: {str(e)[:120]}")
                continue
            errs = [((a.float().cpu() - b).norm() / b.norm()).item() for a, b in zip([out, *grads], [ref, *ref_grads])]
            lines.append(f"D={dim} {name}: out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks.kernel_head_dims needs a CUDA GPU (the kernels it probes are CUDA kernels)", file=sys.stderr)
        return 2
    print("\n".join(probe(tuple(args.head_dims))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
