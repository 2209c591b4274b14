"""A Hugging Face GPT-2 of the seed model's size, padded against packed, on the same documents.

    python -m benchmarks.hf                          # train steps, every method that runs here
    python -m benchmarks.hf --mode eval --json out.json

The seed article's last section trains ``GPT2LMHeadModel`` on packed rows; this runs that model
(24 layers, dim 1024, 16 heads, vocab 1024, 1024 positions, no dropout) on the seed distribution
(``--batch-size`` documents a step, lengths uniform in [1, 1023]) in bf16 autocast with SGD. Rows:

- ``pad_max + sdpa``: every document padded to 1024 with a 2-D attention mask (the baseline);
- ``pad_longest + sdpa``: padded to the longest, rounded up to 64;
- ``concat + packing_varlen``: one packed row, ``cu_seq_lens`` into torch's varlen kernel;
- ``concat + sdpa``: one packed row with a 4-D block-causal bool mask (T x T);
- ``concat + flash_attention_2``: only where the flash-attn package is installed.

Every row starts from the same weights and sees the same documents; the ratio column is against
pad_max + sdpa in the same run. Throughput counts real tokens only. Eval is causal here (GPT-2 has
no bidirectional mode), unlike the seed article's eval.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.cli import Parser, resolve_device
from benchmarks.varlen import StepClock, _non_negative, _positive, _sync
from packing import Batch, SyntheticDocs, get_collator
from packing.hf import hf_kwargs, shifted_labels

METHODS = ("pad_max+sdpa", "pad_longest+sdpa", "concat+packing_varlen", "concat+sdpa", "concat+flash_attention_2")
BASELINE = METHODS[0]


@dataclass
class HFRecord:
    """One row, as written to ``--json``."""

    method: str
    mode: str
    gpu: str | None
    torch: str
    transformers: str
    batch_size: int
    steps: int
    warmup: int
    ms_per_step: float
    median_ms_per_step: float
    tokens_per_s: float
    padding_fraction: float
    peak_mem_bytes: int | None
    loss: float
    speedup_vs_baseline: float | None = None
    command: str = ""


def build_parser() -> Parser:
    p = Parser(prog="python -m benchmarks.hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="train", choices=["train", "eval"], help="train step (SGD) or forward only")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="rows to run (default: all that run here)")
    p.add_argument("--device", help="cuda if available, else cpu")
    p.add_argument("--steps", type=_positive, default=20, help="timed steps per method (default 20)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=_positive, default=32, help="documents per step (default 32)")
    p.add_argument("--layers", type=_positive, default=24, help="GPT-2 layers (default 24, the seed model)")
    p.add_argument("--dim", type=_positive, default=1024, help="hidden size (default 1024; 16 heads of dim / 16)")
    p.add_argument("--seed", type=int, default=0, help="documents and weights (default 0)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    return p


def gpt2(args: Any, attn_implementation: str):
    import transformers
    from models.hf_attention import register

    register()
    config = transformers.GPT2Config(
        vocab_size=1024, n_positions=1024, n_embd=args.dim, n_layer=args.layers, n_head=16,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(args.seed)  # the same weights for every row
    return transformers.GPT2LMHeadModel(config)


def padded_kwargs(batch: Batch) -> dict[str, Any]:
    """transformers' kwargs for a padded batch: a 2-D mask and labels shifted right, -100 at padding."""
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.long(),
            "labels": shifted_labels(batch), "shift_labels": batch.labels}


def run_method(method: str, args: Any, device: torch.device, batches: list[Batch]) -> HFRecord:
    collate, impl = method.split("+")
    model = gpt2(args, impl).to(device)
    train = args.mode == "train"
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    bf16 = device.type == "cuda"

    def step(batch: Batch) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        kwargs = padded_kwargs(batch) if batch.layout == "padded" else hf_kwargs(batch, model)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if not train:
                with torch.inference_mode():
                    return model(**kwargs).loss
            loss = model(**kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for batch in batches[: args.warmup]:
        step(batch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, losses = StepClock(device), []
    timed = batches[args.warmup :]
    for batch in timed:
        with clock:
            losses.append(step(batch))
    _sync(device)
    elapsed = clock.total_s()
    import transformers

    return HFRecord(
        method=method, mode=args.mode, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        torch=torch.__version__, transformers=transformers.__version__, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, ms_per_step=1000 * elapsed / args.steps,
        median_ms_per_step=statistics.median(clock.step_ms()), tokens_per_s=sum(b.num_tokens for b in timed) / elapsed,
        padding_fraction=1 - sum(b.num_tokens for b in timed) / sum(b.num_slots for b in timed),
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        loss=torch.stack(losses).float().mean().item(),
    )


def available_methods(device: torch.device) -> list[str]:
    methods = [m for m in METHODS if m != "concat+flash_attention_2"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        methods.append("concat+flash_attention_2")
    return methods


def run(args: Any) -> list[HFRecord]:
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("benchmarks.hf needs transformers: pip install -e '.[hf]'")
    device = resolve_device(args.device)
    methods = args.methods or available_methods(device)
    if "concat+flash_attention_2" in methods and "concat+flash_attention_2" not in available_methods(device):
        raise ValueError("concat+flash_attention_2 needs CUDA and the flash-attn package; leave it out of --methods")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)
    docs = SyntheticDocs((args.warmup + args.steps) * args.batch_size, max_len=1024, vocab_size=1024, seed=args.seed)
    steps = [[docs[j] for j in range(i * args.batch_size, (i + 1) * args.batch_size)] for i in range(args.warmup + args.steps)]
    collators = {"pad_max": get_collator("pad_max", max_len=1024),
                 "pad_longest": get_collator("pad_longest", pad_to_multiple_of=64), "concat": get_collator("concat")}
    records = []
    for method in methods:
        batches = [collators[method.split("+")[0]](s) for s in steps]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        records.append(run_method(method, args, device, batches))
    base = records[0]
    for r in records:
        r.speedup_vs_baseline = r.tokens_per_s / base.tokens_per_s
    return records


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        records = run(args)
    except (ValueError, TypeError, ImportError) as e:
        return parser.fail(e)
    command = parser.command(argv)
    r0 = records[0]
    print(f"gpu={r0.gpu} torch={r0.torch} transformers={r0.transformers} mode={r0.mode} batch_size={r0.batch_size} "
          f"steps={r0.steps} warmup={r0.warmup} layers={args.layers} dim={args.dim}")
    print(f"{'method':<26}{'ms/step':>9}{'real tok/s':>12}{'padding':>9}{'peak mem':>11}{'loss':>9}  x {BASELINE}")
    for r in records:
        r.command = command
        mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**30:.2f} GiB"
        print(f"{r.method:<26}{r.ms_per_step:>9.1f}{r.tokens_per_s:>12,.0f}{100 * r.padding_fraction:>8.1f}%"
              f"{mem:>11}{r.loss:>9.4f}  {r.speedup_vs_baseline:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
