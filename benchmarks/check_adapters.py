"""Check every attention adapter against the fp32 naive reference on the same documents.

    python -m benchmarks.check_adapters                      # on a GPU: bf16, writes a new file in benchmarks/results/
    python -m benchmarks.check_adapters --device cpu --dtype fp32 --json /tmp/adapters.json

The documents (lengths include 1, 7, 130 and 1023 by default) are laid out the way each adapter
takes them: padded for ``sdpa``, nested for ``sdpa_nested``, packed with a padding tail for
``flash``, ``xformers`` and ``flex``. q, k and v are random; the reference is the ``naive`` adapter in
fp32 on the packed documents without padding. For each adapter and for causal and bidirectional
attention it records the forward relative error ‖out - ref‖ / ‖ref‖ over real tokens, and the
backward one over the concatenated gradients of q, k and v for one random upstream gradient. The
``kernel`` columns compare against the reference run on the inputs already rounded to ``--dtype``:
in bf16 the input rounding alone is about 3e-3 and hides the kernels' own differences.
A case the adapter declares unsupported on the device (no causal NestedTensor SDPA on CPU, no
FlexAttention backward on CPU) is recorded with its reason, not silently skipped. Exits 1 if any
error exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.harness import Parser, resolve_device
from models import ADAPTERS, collator_for, get_adapter
from packing import Batch, get_collator

DEFAULT_LENGTHS = "1,7,130,1023,512,64,300"


@dataclass
class Check:
    adapter: str
    backend: str
    layout: str
    causal: bool
    device: str
    gpu: str | None
    torch: str
    dtype: str
    lengths: list[int]
    fwd_rel_err: float | None
    bwd_rel_err: float | None
    fwd_kernel_err: float | None
    bwd_kernel_err: float | None
    tol: float
    status: str  # "ok", "FAIL", or "unsupported: <reason>"


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def layout_form(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(N, H, D) real-token rows -> the adapter's dense token form; padding gets random values.
    The inverse of ``batch.real``."""
    if batch.layout == "nested":
        return x.clone()
    dense = torch.randn((*batch.unwrap(batch.input_ids).shape, *x.shape[1:]), device=x.device, dtype=x.dtype)
    if batch.layout == "packed":
        dense[: batch.num_tokens] = x
    else:
        dense[batch.attention_mask] = x  # row-major over (B, L) is sequence order
    return dense


def reference(naive, qkv, upstream, batch, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 naive output (N, H, D) and the concatenated q, k, v gradients for ``upstream``."""
    inputs = [t.detach().clone().requires_grad_() for t in qkv]
    out = naive(*inputs, batch, causal=causal)
    (out * upstream).sum().backward()
    return out.detach(), torch.cat([t.grad for t in inputs])


def check_adapter(name: str, lengths: list[int], args: argparse.Namespace, device: torch.device) -> list[Check]:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    collate = collator_for(name)
    options = {"pad_to_multiple_of": 64} if collate in ("concat", "xformers") else {}  # a padding tail to ignore
    samples = [torch.ones(n, dtype=torch.long) for n in lengths]  # ids do not matter here
    batch = get_collator(collate, **options)(samples).to(device)
    layout = batch.layout
    reference_batch = get_collator("concat")(samples).to(device)
    adapter = get_adapter(name, layout, device)
    adapter.bind_head_dim(args.head_dim)  # backend then names the kernel that runs this head dimension
    naive = get_adapter("naive", "packed", device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    g = torch.Generator(device=device).manual_seed(args.seed)
    N = sum(lengths)
    checks = []
    for causal in (True, False):
        q, k, v, upstream = (
            torch.randn(N, args.heads, args.head_dim, device=device, generator=g) for _ in range(4)
        )
        common = dict(adapter=name, backend=adapter.backend, layout=layout, causal=causal, device=device.type,
                      gpu=gpu, torch=torch.__version__, dtype=args.dtype, lengths=lengths, tol=args.tol)
        reason = adapter.unsupported(causal=causal, grad=False)
        if reason:
            checks.append(Check(**common, fwd_rel_err=None, bwd_rel_err=None, fwd_kernel_err=None,
                                bwd_kernel_err=None, status=f"unsupported: {reason}"))
            continue
        ref, ref_grads = reference(naive, (q, k, v), upstream, reference_batch, causal)
        # The same reference on inputs rounded to the test dtype: what is left is the kernel's own error.
        rounded = [t.to(dtype).float() for t in (q, k, v)]
        kref, kref_grads = reference(naive, rounded, upstream, reference_batch, causal)

        can_grad = adapter.unsupported(causal=causal, grad=True) is None
        test_in = [layout_form(t, batch).to(dtype).requires_grad_(can_grad) for t in (q, k, v)]
        out = batch.real(adapter(*test_in, batch, causal=causal))
        fwd, fwd_kernel = rel(out, ref), rel(out, kref)
        bwd = bwd_kernel = None
        status = "ok"
        if can_grad:
            (out.float() * upstream).sum().backward()
            got = torch.cat([batch.real(t.grad) for t in test_in])
            bwd, bwd_kernel = rel(got, ref_grads), rel(got, kref_grads)
        else:
            status = f"ok forward; backward unsupported: {adapter.unsupported(causal=causal, grad=True)}"
        if not (fwd <= args.tol and (bwd is None or bwd <= args.tol)):
            status = "FAIL"
        checks.append(Check(**common, fwd_rel_err=fwd, bwd_rel_err=bwd, fwd_kernel_err=fwd_kernel,
                            bwd_kernel_err=bwd_kernel, status=status))
    return checks


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.check_adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 on CUDA, fp32 on CPU by default")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"document lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tol", type=float, default=2e-2, help="relative error bound (default 2e-2, bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="where to write the records (default: a new file, "
                   "benchmarks/results/adapters-DEVICE-DATE-TIME.json; the committed records are never overwritten)")
    return p


def new_record_path(device: str, folder: str = "benchmarks/results") -> Path:
    """A file that does not exist yet, named by device and time: a run never overwrites a record."""
    stem = f"adapters-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = Path(folder) / f"{stem}.json", 1
    while path.exists():
        path, n = Path(folder) / f"{stem}-{n}.json", n + 1
    return path


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--lengths {text!r} is not a comma-separated list of ints, e.g. {DEFAULT_LENGTHS}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths {text!r} must hold at least one length, each >= 1")
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        lengths = parse_lengths(args.lengths)
        names = [n for n, cls in ADAPTERS.items() if n != "naive" and cls.available(device)]
        checks = [c for name in names for c in check_adapter(name, lengths, args, device)]
    except (ValueError, TypeError) as e:
        return parser.fail(e)
    unavailable = [n for n, cls in ADAPTERS.items() if n != "naive" and not cls.available(device)]
    print(f"device={device.type} gpu={checks[0].gpu if checks else None} torch={torch.__version__} dtype={args.dtype} "
          f"lengths={lengths} tol={args.tol}")
    print(f"{'adapter':12} {'backend':20} {'causal':6} {'fwd err':>9} {'bwd err':>9} {'fwd kern':>9} {'bwd kern':>9}  status")
    for c in checks:
        errs = [c.fwd_rel_err, c.bwd_rel_err, c.fwd_kernel_err, c.bwd_kernel_err]
        cols = " ".join("        -" if e is None else f"{e:9.2e}" for e in errs)
        print(f"{c.adapter:12} {c.backend:20} {str(c.causal):6} {cols}  {c.status}")
    if unavailable:
        print(f"not available on {device.type}: {', '.join(unavailable)}")
    path = Path(args.json) if args.json else new_record_path(device.type)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(c) for c in checks], indent=2) + "\n")
    print(f"records: {path}")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
