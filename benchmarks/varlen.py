"""The seed experiment: every batching method side by side on the same documents.

    python -m benchmarks.varlen --collate concat            # concat, against the pad_max baseline
    python -m benchmarks.varlen --collate all --mode eval   # all five collates
    python -m benchmarks.varlen --collate all --json out.json
    python -m benchmarks.varlen --sampler pack --max-tokens 16384 --static --compile   # one shape, compiled once

Step i of every collate sees the same ``--batch-size`` documents of the seed distribution (lengths
uniform in [1, max_len - 1], tokens uniform in [1, vocab - 1]) and a model built from the same seed,
so rows differ only in how the batch is laid out and which attention kernel runs. Train steps are
causal with SGD; eval steps are bidirectional, as in the seed article. Throughput counts real tokens
only; ms/step is the mean over timed steps, and the JSON also has the median. Unless
``--no-baseline`` is given, pad_max is measured in the same run, and every row shows
its throughput ratio against it.

Defaults follow the device: on CUDA the ``seed`` preset in bf16 autocast, on CPU the ``tiny`` preset
in fp32. Batches are collated before timing (a DataLoader worker's job) and pinned on CUDA; the
timed loop includes the host-to-device copy. Before timing, each padded width that the warm-up
steps missed gets one untimed step without an optimizer update (see ``unseen_widths``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.cli import Parser, resolve_device
from models import ADAPTERS, GPT, PRESETS, GPTConfig, get_adapter, lm_loss
from packing import (
    COLLATORS,
    Batch,
    LengthBucketSampler,
    PackingSampler,
    SplitDocuments,
    SyntheticDocs,
    get_collator,
)
from packing.distributed import global_num_targets, loss_scale, world_size
from packing.data.shard_reader import ShardDataset

BASELINE = "pad_max"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Record:
    """One benchmark row, as written to ``--json``."""

    collate: str
    attn: str
    backend: str
    mode: str
    device: str
    gpu: str | None
    torch: str
    preset: str
    dtype: str
    batch_size: int
    steps: int
    warmup: int
    seed: int
    ms_per_step: float
    median_ms_per_step: float
    tokens_per_s: float
    padding_fraction: float
    peak_mem_bytes: int | None
    loss: float
    compile: bool
    world_size: int
    compile_mode: str | None = None
    static: bool = False
    rank: int | None = 0  # None: the row that merges all ranks
    parallel: str = "none"  # "none", "ddp" or "fsdp2"
    sampler: str = "fixed"
    max_tokens: int | None = None
    data: str = "synthetic"
    command: str = ""
    speedup_vs_baseline: float | None = None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.varlen", description=__doc__.split("\n\n")[0])
    p.add_argument("--collate", default="concat", choices=[*COLLATORS, "all"], help="batching method (default concat)")
    p.add_argument("--attn", default="auto", choices=["auto", *ADAPTERS], help="attention adapter (default auto)")
    p.add_argument("--mode", default="train", choices=["train", "eval"], help="causal train step or bidirectional eval")
    p.add_argument("--preset", choices=list(PRESETS), help="model size (default: seed on CUDA, tiny on CPU)")
    p.add_argument("--device", help="cuda if available, else cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 autocast on CUDA, fp32 on CPU by default")
    p.add_argument("--steps", type=_positive, default=10, help="timed steps per collate (default 10)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=_positive, help="documents per step (default 32; 4 for the long preset)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the pad_max baseline row stays eager)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile; reduce-overhead records CUDA graphs (default: default)")
    p.add_argument("--static", action="store_true",
                   help="static shapes for the packed collates, with --sampler pack: rows padded to --max-tokens, "
                        "fixed-length cu_seqlens and a constant max_seqlen; with --compile, dynamic=False")
    p.add_argument("--max-seqs", type=_positive, default=64,
                   help="with --static: at most this many documents per pack (default 64)")
    p.add_argument("--pad-to-multiple-of", type=_positive, default=64, help="pad_longest rounding (default 64)")
    p.add_argument("--seed", type=int, default=0, help="documents and model init (default 0)")
    p.add_argument("--no-baseline", action="store_true", help=f"do not add the {BASELINE} row for the ratio column")
    p.add_argument("--sampler", choices=["fixed", "pack", "bucket"], default="fixed",
                   help="fixed: --batch-size documents a step; pack: PackingSampler; bucket: LengthBucketSampler")
    p.add_argument("--max-tokens", type=_positive, default=16384, help="token budget for --sampler pack|bucket (default 16,384)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--data", metavar="SHARDS", help="real documents from shards written by python -m packing.data.shards: "
                   "a directory, 'DIR/shard-{000000..000009}.tar' or a glob (default: synthetic seed documents)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--profile", metavar="PATH", help="after timing, profile a pass over the timed batches "
                   "(no optimizer update) and append each collate's top ops by device time to PATH")
    return p


def make_collator(name: str, config: GPTConfig, args: argparse.Namespace):
    if name == "pad_max":
        return get_collator(name, max_len=config.max_len)
    if name == "pad_longest":
        return get_collator(name, pad_to_multiple_of=args.pad_to_multiple_of)
    if args.static and COLLATORS[name].layout == "packed":
        return get_collator(name, total_tokens=args.max_tokens, max_seqs=args.max_seqs, max_seqlen=config.max_len)
    return get_collator(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Times each ``with clock:`` block without syncing inside the loop: CUDA events on a GPU,
    the host clock on a CPU. Read the times only after the final synchronize."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __enter__(self) -> None:
        self.marks.append([self._mark()])

    def __exit__(self, *exc) -> None:
        self.marks[-1].append(self._mark())

    def step_ms(self) -> list[float]:
        if self.cuda:
            return [start.elapsed_time(end) for start, end in self.marks]
        return [1000 * (end - start) for start, end in self.marks]

    def total_s(self) -> float:
        first, last = self.marks[0][0], self.marks[-1][1]
        return first.elapsed_time(last) / 1000 if self.cuda else last - first


def unseen_widths(warmup: list[Batch], timed: list[Batch]) -> list[Batch]:
    """One timed batch for each padded width the warm-up steps did not cover.

    The first step at a new (B, L) shape pays one-time costs (kernel selection, allocator growth)
    that a real run pays once per width, and pad_longest has up to max_len / 64 widths. Packed and
    nested batches change length every step, so their kernels take any length and need no warm-up.
    """
    seen = {tuple(b.input_ids.shape) for b in warmup if b.layout == "padded"}
    extra = []
    for b in timed:
        if b.layout == "padded" and tuple(b.input_ids.shape) not in seen:
            seen.add(tuple(b.input_ids.shape))
            extra.append(b)
    return extra


def profile_pass(title: str, batches: list[Batch], step, device: torch.device, path: str) -> None:
    """Profile one untimed pass and append the top ops by device (or CPU) time to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch, update=False)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"## {title}: {len(batches)} steps\n{prof.key_averages().table(sort_by=sort, row_limit=25)}\n")


def load_documents(args: argparse.Namespace, config: GPTConfig, world: int) -> tuple[Any, np.ndarray, GPTConfig, str]:
    """The documents every collate sees, their lengths, the model config they need, and a description.

    Shards: documents longer than the model's ``max_len`` are split into chunks (position embeddings
    end there), never truncated; the vocabulary grows to the shards' if it is larger.
    """
    n_steps = args.warmup + args.steps
    if args.data is None:
        if args.sampler == "fixed":
            count = n_steps * world * args.batch_size
        else:
            # An epoch's worth of packs, 8x the steps: its few part-filled packs (the leftovers, one
            # to four an epoch) are then rare among the timed steps, as in a real epoch. With 1.25x,
            # 4 of 34 packs were part-filled and the timed steps averaged 11.5% padding on the seed workload.
            count = int(8 * n_steps * world * (args.max_tokens // max(1, config.max_len // 2) + 2))
        docs = SyntheticDocs(count, max_len=config.max_len, vocab_size=config.vocab_size, seed=args.seed)
        return docs, docs.lengths, config, f"synthetic: lengths uniform in [1, {config.max_len - 1}]"
    shards = ShardDataset(args.data)
    view = SplitDocuments(shards, shards.lengths, max_len=config.max_len)
    index = Path(shards.infos[0].path).parent / "index.json"
    vocab = json.loads(index.read_text())["vocab_size"] if index.is_file() else config.vocab_size
    if vocab > config.vocab_size:
        config = dataclasses.replace(config, vocab_size=vocab)
    return view, view.lengths, config, (f"{args.data}: {len(shards)} documents, {view.num_split} longer than max_len "
                                        f"{config.max_len} split into {len(view)} chunks; vocab {config.vocab_size}")


def plan_steps(args: argparse.Namespace, lengths: np.ndarray, world: int, rank: int) -> list[list[int]]:
    """Document indices for each of this rank's warm-up and timed steps, the same for every collate.

    fixed: ``--batch-size`` documents a step per rank (shards: a seeded random selection); pack and
    bucket: the sampler's batches for this rank, sharded by rank with equal counts on every rank.
    """
    n_steps, B = args.warmup + args.steps, args.batch_size
    if args.sampler == "fixed":
        needed = n_steps * B * world
        if len(lengths) < needed:
            raise ValueError(f"--data holds {len(lengths)} documents; --batch-size x (--warmup + --steps) x ranks "
                             f"needs {needed}")
        order = np.arange(needed) if args.data is None else np.random.default_rng(args.seed).permutation(len(lengths))
        return [order[(i * world + rank) * B : (i * world + rank + 1) * B].tolist() for i in range(n_steps)]
    if args.sampler == "pack":
        sampler = PackingSampler(lengths, max_tokens=args.max_tokens, seed=args.seed, num_replicas=world, rank=rank,
                                 max_seqs=args.max_seqs if args.static else None)
    else:
        sampler = LengthBucketSampler(lengths, max_tokens=args.max_tokens, seed=args.seed, num_replicas=world,
                                      rank=rank, pad_to_multiple_of=args.pad_to_multiple_of)
    steps = list(itertools.islice(sampler, n_steps))
    if len(steps) < n_steps:
        raise ValueError(f"--sampler {args.sampler} makes {len(steps)} batches per rank from these documents; "
                         f"--warmup + --steps needs {n_steps}: use fewer steps or more data")
    return steps


def run_collate(name: str, args: argparse.Namespace, config: GPTConfig, device: torch.device, docs: Any,
                steps: list[list[int]]) -> Record:
    """Time ``args.steps`` steps of collate ``name`` after ``args.warmup`` untimed ones."""
    collator = make_collator(name, config, args)
    batches: list[Batch] = [collator([docs[j] for j in step]) for step in steps]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    torch.manual_seed(args.seed)  # same weights for every collate
    model = gpt = GPT(config, attn=args.attn).to(device)
    adapter = model.adapter(collator.layout, device)
    world = world_size()
    if world > 1:
        model = wrap_data_parallel(model, args.fsdp)
    static = args.static and collator.layout == "packed"
    if args.compile:
        # Static: one shape and one set of constants, compiled once (dynamic=False). Otherwise shapes
        # change with every batch: after the first recompile dynamo marks them dynamic, so the
        # warm-up steps absorb the compilation (give --warmup 3 or more).
        model = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode,
                              dynamic=False if static else None)
    train = args.mode == "train"
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3) if train else None
    bf16 = args.dtype == "bf16"
    # Eval needs no gradient sync; inference_mode tensors do not mix with collectives, no_grad does.
    no_grad = torch.inference_mode if world == 1 else torch.no_grad

    def step(batch: Batch, update: bool = True) -> torch.Tensor:
        if args.compile:
            gpt.check(batch)  # the compiled forward skips it (see GPT.check)
        batch = batch.to(device, non_blocking=True)
        # The global mean over every rank's real targets (a host int when alone: no sync at all).
        total = batch.num_targets if world == 1 else global_num_targets(batch.num_targets, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if not train:
                with no_grad():
                    return lm_loss(model(batch, causal=False), batch, normalizer=total)
            loss = lm_loss(model(batch, causal=True), batch, normalizer=total)
        (loss * loss_scale()).backward()
        if update:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    timed = batches[args.warmup :]
    for batch in batches[: args.warmup]:
        step(batch)
    for batch in unseen_widths(batches[: args.warmup], timed):
        step(batch, update=False)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    losses = []
    for batch in timed:
        with clock:
            losses.append(step(batch))
    _sync(device)
    elapsed = clock.total_s()
    if args.profile:
        profile_pass(f"{name} + {adapter.name} ({adapter.backend}), {args.mode}", timed, step, device, args.profile)
    tokens = sum(b.num_tokens for b in timed)
    loss = torch.stack(losses).float().mean()
    if world > 1:
        torch.distributed.all_reduce(loss)  # each rank holds its share of the global mean
    return Record(
        collate=name,
        attn=adapter.name,
        backend=adapter.backend,
        mode=args.mode,
        device=device.type,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        torch=torch.__version__,
        preset=args.preset,
        dtype=args.dtype,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        ms_per_step=1000 * elapsed / args.steps,
        median_ms_per_step=statistics.median(clock.step_ms()),
        tokens_per_s=tokens / elapsed,
        padding_fraction=1 - tokens / sum(b.num_slots for b in timed),
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        loss=loss.item(),
        compile=args.compile,
        compile_mode=args.compile_mode if args.compile else None,
        static=static,
        world_size=world,
        rank=torch.distributed.get_rank() if world > 1 else 0,
        parallel="none" if world == 1 else ("fsdp2" if args.fsdp else "ddp"),
        sampler=args.sampler,
        max_tokens=None if args.sampler == "fixed" else args.max_tokens,
        data=args.data or "synthetic",
    )


def setup_label(r: Record) -> str:
    """How a row ran: eager or compiled (with its mode), and static shapes if so."""
    how = "eager" if not r.compile else ("compiled" if r.compile_mode in (None, "default") else r.compile_mode)
    return f"{how}, static" if r.static else how


def format_table(records: list[Record]) -> str:
    header = ["collate", "attn", "backend", "setup", "mode", "ms/step", "real tok/s", "padding", "peak mem", "loss", f"x {BASELINE}"]
    rows = [
        [
            r.collate,
            r.attn,
            r.backend,
            setup_label(r),
            r.mode,
            f"{r.ms_per_step:.1f}",
            f"{r.tokens_per_s:,.0f}",
            f"{100 * r.padding_fraction:.1f}%",
            "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**30:.2f} GiB",
            f"{r.loss:.5f}",
            "-" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}",
        ]
        for r in records
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def start_distributed(args: argparse.Namespace) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1), join the process group: NCCL on CUDA, gloo on CPU."""
    device = resolve_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap_data_parallel(model: GPT, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2 with one shard unit per block. Batches are moved by hand (device_ids=None), so
    DDP never rebuilds the Batch dataclass."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=None)


def merge_ranks(records: list[Record]) -> Record:
    """One row for the whole job: tokens/s summed over ranks, the slowest rank's step time."""
    tokens = [r.tokens_per_s * r.ms_per_step * r.steps / 1000 for r in records]  # real tokens per rank
    slots = [t / (1 - r.padding_fraction) for t, r in zip(tokens, records)]
    mems = [r.peak_mem_bytes for r in records if r.peak_mem_bytes is not None]
    return dataclasses.replace(
        records[0], rank=None, tokens_per_s=sum(r.tokens_per_s for r in records),
        ms_per_step=max(r.ms_per_step for r in records), median_ms_per_step=max(r.median_ms_per_step for r in records),
        padding_fraction=1 - sum(tokens) / sum(slots), peak_mem_bytes=max(mems) if mems else None,
        gpu=", ".join(sorted({r.gpu for r in records if r.gpu})) or None)


def run(args: argparse.Namespace) -> list[Record]:
    """Every requested collate, on this rank; returns this rank's records."""
    device = start_distributed(args)
    world, rank = world_size(), (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
    args.preset = args.preset or ("seed" if device.type == "cuda" else "tiny")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.batch_size = args.batch_size or (4 if args.preset == "long" else 32)
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards across ranks: run under torchrun --nproc_per_node N with N >= 2")
    if args.static and args.sampler != "pack":
        raise ValueError(f"--static pads every pack to --max-tokens: it needs --sampler pack, got --sampler {args.sampler}")
    if args.compile_mode != "default" and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compile")
    docs, lengths, config, args.data_description = load_documents(args, PRESETS[args.preset], world)
    steps = plan_steps(args, lengths, world, rank)
    names = list(COLLATORS) if args.collate == "all" else [args.collate]
    if not args.no_baseline and BASELINE not in names:
        names.insert(0, BASELINE)
    # The added baseline row runs pad_max with its best adapter, whatever --attn the others use.
    attns = {n: "auto" if n == BASELINE and args.collate != BASELINE else args.attn for n in names}
    # The xformers collate exists to feed its own mask to xFormers' kernel; "auto" by layout alone
    # would hand its packed row to flash instead.
    if attns.get("xformers") == "auto" and ADAPTERS["xformers"].available(device):
        attns["xformers"] = "xformers"
    # Fail on a bad --attn/--collate pairing or a missing optional package before any timing.
    for name in names:
        get_adapter(attns[name], COLLATORS[name].layout, device)
        make_collator(name, config, args)
    # The ratio column is against pad_max + sdpa *eager*; with --compile, every other row compiles.
    eager = {n: n == BASELINE and args.collate != BASELINE for n in names}
    return [
        run_collate(name, argparse.Namespace(**{**vars(args), "attn": attns[name], "compile": args.compile and not eager[name]}),
                    config, device, docs, steps)
        for name in names
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        records = run(args)
    except (ValueError, TypeError, ImportError) as e:
        return parser.fail(e)
    command = parser.command(argv)
    if world_size() > 1:
        command = f"torchrun --nproc_per_node {world_size()} -m benchmarks.varlen " + command.split(" ", 3)[-1]
    for r in records:
        r.command = command
    shown = records
    if world_size() > 1:  # every rank's rows to rank 0, which merges and writes one file
        gathered: list = [None] * world_size()
        torch.distributed.all_gather_object(gathered, [asdict(r) for r in records])
        per_rank = [[Record(**d) for d in rank_rows] for rank_rows in gathered]
        shown = [merge_ranks([rows[i] for rows in per_rank]) for i in range(len(records))]
        records = [r for rows in per_rank for r in rows] + shown
        rank = torch.distributed.get_rank()
        torch.distributed.barrier()  # teardown together: gloo can abort a rank that exits mid-teardown
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    base = next((r for r in shown if r.collate == BASELINE), None)
    for r in shown:
        r.speedup_vs_baseline = None if base is None else r.tokens_per_s / base.tokens_per_s
    r0 = shown[0]
    print(
        f"device={r0.device} gpu={r0.gpu} torch={r0.torch} preset={r0.preset} dtype={r0.dtype} mode={r0.mode} "
        f"sampler={r0.sampler} batch_size={r0.batch_size} max_tokens={r0.max_tokens} steps={r0.steps} "
        f"warmup={r0.warmup} seed={r0.seed} world_size={r0.world_size} parallel={r0.parallel}"
    )
    print(f"documents: {args.data_description}")
    print(format_table(shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=2)
    return 0


def _exit_after_distributed(code: int) -> None:
    """Leave a torchrun worker without Python finalisation.

    After a clean barrier and destroy_process_group, gloo's C++ threads can still hold tensors whose
    release at interpreter shutdown aborts the process (SIGABRT, "terminate called without an active
    exception"; 3 of 12 two-rank FSDP2 runs on CPU here; pytorch/pytorch#179291). Everything is
    written and flushed by then, so skipping finalisation loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_after_distributed(code)
    sys.exit(code)
