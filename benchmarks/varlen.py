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

import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.harness import (
    CUDA_GRAPH_MODES,
    Parser,
    Record,
    RunConfig,
    cell,
    environment,
    exit_after_distributed,
    format_table,
    gemm_tflops,
    gather_records,
    gib,
    merge_ranks,
    positive,
    profile_pass,
    resolve_device,
    start_distributed,
    time_steps,
    wrap_data_parallel,
    write_json,
)
from models import ADAPTERS, GPT, PRESETS, GPTConfig, get_adapter, lm_loss
from benchmarks.bf16_weights import BF16Weights
from models.fusion import resolve_fuse
from packing import (
    COLLATORS,
    Batch,
    LengthBucketSampler,
    PackingSampler,
    SplitDocuments,
    SyntheticDocs,
    get_collator,
)
from packing.collate import block_diagonal_mask_class
from packing.data.shard_reader import ShardDataset
from packing.data.split import CLI_FIX, TOO_LONG, plan_chunks
from packing.distributed import global_num_targets, loss_scale, rank, world_size

BASELINE = "pad_max"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class VarlenConfig(RunConfig):
    """One run of this benchmark (see :func:`build_parser` for each setting); ``preset``, ``dtype``
    and ``batch_size`` are None until :meth:`resolved` fills them in from the device."""

    collate: str = "concat"
    attn: str = "auto"
    preset: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    compile: bool = False
    compile_mode: str = "default"
    static: bool = False
    max_seqs: int = 64
    pad_to_multiple_of: int = 64
    no_baseline: bool = False
    sampler: str = "fixed"
    max_tokens: int = 16384
    fsdp: bool = False
    data: str | None = None
    too_long: str = "split"
    profile: str | None = None
    fuse: str = "none"
    bf16_weights: bool = False
    optimizer: str = "sgd"

    def resolved(self, device: torch.device) -> VarlenConfig:
        """Defaults that follow the device: the seed model in bf16 on CUDA, tiny in fp32 on a CPU."""
        preset = self.preset or ("seed" if device.type == "cuda" else "tiny")
        return dataclasses.replace(self, preset=preset, dtype=self.dtype or ("bf16" if device.type == "cuda" else "fp32"),
                                   batch_size=self.batch_size or (4 if preset == "long" else 32))


@dataclass(kw_only=True)
class VarlenRecord(Record):
    """One benchmark row, as written to ``--json``: what ran, and the shared measured fields."""

    collate: str
    attn: str
    backend: str
    preset: str
    dtype: str
    compile: bool
    world_size: int
    compile_mode: str | None = None
    static: bool = False
    rank: int | None = 0  # None: the row that merges all ranks
    parallel: str = "none"  # "none", "ddp" or "fsdp2"
    sampler: str = "fixed"
    max_tokens: int | None = None
    data: str = "synthetic"
    fuse: str = "none"
    bf16_weights: bool = False
    optimizer: str | None = None  # the train step's update: "sgd" or "adamw" (None for eval)
    matmul_params: int = 0  # N: the Linear weights' elements, the head included
    gemm_tflops: float | None = None  # the GPU's bf16 GEMM rate at the model's shapes, this run
    roofline_fraction: float | None = None  # matmul floor (6·N·T train, 2·N·T eval, T real tokens) / ms_per_step


def build_parser() -> Parser:
    p = Parser(prog="python -m benchmarks.varlen", description=__doc__.split("\n\n")[0])
    p.add_argument("--collate", default="concat", choices=[*COLLATORS, "all"], help="batching method (default concat)")
    p.add_argument("--attn", default="auto", choices=["auto", *ADAPTERS], help="attention adapter (default auto)")
    VarlenConfig.add_arguments(p, mode_help="causal train step or bidirectional eval", steps_help="timed steps per collate")
    p.add_argument("--preset", choices=list(PRESETS), help="model size (default: seed on CUDA, tiny on CPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 autocast on CUDA, fp32 on CPU by default")
    p.add_argument("--batch-size", type=positive, help="documents per step (default 32; 4 for the long preset)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the pad_max baseline row stays eager)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile; reduce-overhead records CUDA graphs (default: default)")
    p.add_argument("--static", action="store_true",
                   help="static shapes for the packed collates, with --sampler pack: rows padded to --max-tokens, "
                        "fixed-length cu_seqlens and a constant max_seqlen; with --compile, dynamic=False")
    p.add_argument("--max-seqs", type=positive, default=64,
                   help="with --static: at most this many documents per pack (default 64)")
    p.add_argument("--pad-to-multiple-of", type=positive, default=64, help="pad_longest rounding (default 64)")
    p.add_argument("--no-baseline", action="store_true", help=f"do not add the {BASELINE} row for the ratio column")
    p.add_argument("--sampler", choices=["fixed", "pack", "bucket"], default="fixed",
                   help="fixed: --batch-size documents a step; pack: PackingSampler; bucket: LengthBucketSampler")
    p.add_argument("--max-tokens", type=positive, default=16384, help="token budget for --sampler pack|bucket (default 16,384)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--too-long", choices=TOO_LONG, default="split",
                   help="a document over the model's max_len (or --max-tokens with --sampler pack|bucket): split "
                        "into chunks (default), truncate, or error")
    p.add_argument("--data", metavar="SHARDS", help="real documents from shards written by python -m packing.data.shards: "
                   "a directory, a glob 'DIR/*.tar' or a brace list of existing shards (default: synthetic seed documents)")
    p.add_argument("--fuse", default="none", metavar="NAMES",
                   help="fused kernels for every row but the baseline: 'none' (default), 'auto', or a comma list "
                        "of mlp (GELU in the GEMM epilogues), norm (residual add + LayerNorm), qkv (one qkv gradient)")
    p.add_argument("--bf16-weights", action="store_true",
                   help="train with bf16 copies of the Linear weights and fp32 masters (benchmarks.bf16_weights) "
                        "instead of autocast's per-step weight casts; every row but the baseline")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="the update after each train step: SGD (the seed article's, default) or torch's AdamW "
                        "(fused on CUDA; with --bf16-weights, AdamW on the fp32 masters)")
    p.add_argument("--profile", metavar="PATH", help="after timing, profile a pass over the timed batches "
                   "(no optimizer update) and append each collate's top ops by device time to PATH")
    return p


def make_collator(name: str, config: GPTConfig, args: VarlenConfig):
    if name == "pad_max":
        return get_collator(name, max_len=config.max_len)
    if name == "pad_longest":
        return get_collator(name, pad_to_multiple_of=args.pad_to_multiple_of)
    if args.static and COLLATORS[name].layout == "packed":
        return get_collator(name, total_tokens=args.max_tokens, max_seqs=args.max_seqs, max_seqlen=config.max_len)
    return get_collator(name)


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


def load_documents(args: VarlenConfig, config: GPTConfig, world: int) -> tuple[Any, np.ndarray, GPTConfig, str]:
    """The documents every collate sees, their lengths, the model config they need, and a description.

    A document longer than the model's ``max_len`` (position embeddings end there), or than
    ``--max-tokens`` with ``--sampler pack|bucket``, goes through ``--too-long`` (the policy of
    ``packing.data.split``): split into chunks by default, truncated, or refused naming it. The
    description says how many were split or truncated and the tokens dropped. Shards: the
    vocabulary grows to the shards' if it is larger.
    """
    limit = config.max_len if args.sampler == "fixed" else min(config.max_len, args.max_tokens)
    limit_name = "the model's max_len " if limit == config.max_len else "--max-tokens "
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
        source, name = docs, f"synthetic: lengths uniform in [1, {config.max_len - 1}]"
    else:
        source = ShardDataset(args.data)
        vocab = source.infos[0].vocab_size or config.vocab_size
        if vocab > config.vocab_size:
            config = dataclasses.replace(config, vocab_size=vocab)
        name = f"{args.data}: {len(source):,} documents; vocab {config.vocab_size}"
    if int(source.lengths.max()) <= limit:
        return source, source.lengths, config, name
    if args.too_long == "error":  # refused in the command's words: the limit's flag and --too-long
        plan_chunks(source.lengths, limit, "error", limit=limit_name, fix=CLI_FIX)
    view = SplitDocuments(source, source.lengths, max_len=limit, too_long=args.too_long)
    return view, view.lengths, config, f"{name}; {view.plan.summary().replace('max_len ', limit_name)}"


def plan_steps(args: VarlenConfig, lengths: np.ndarray, world: int, rank: int) -> list[list[int]]:
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


def run_collate(name: str, args: VarlenConfig, config: GPTConfig, device: torch.device, docs: Any,
                steps: list[list[int]]) -> VarlenRecord:
    """Time ``args.steps`` steps of collate ``name`` after ``args.warmup`` untimed ones."""
    collator = make_collator(name, config, args)
    batches: list[Batch] = [collator([docs[j] for j in step]) for step in steps]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    torch.manual_seed(args.seed)  # same weights for every collate
    model = gpt = GPT(config, attn=args.attn, fuse=args.fuse).to(device)
    shadow = (BF16Weights(gpt, lr=1e-3, optimizer=args.optimizer)
              if args.bf16_weights and args.mode == "train" else None)
    adapter = model.adapter_for(batches[0], device)
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
    if not train:
        opt = None
    elif shadow is not None:
        opt = shadow
    elif args.optimizer == "adamw":  # torch's fused AdamW on CUDA, as users train
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
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

    warmup, timed = batches[: args.warmup], batches[args.warmup :]
    warm = [lambda b=b: step(b) for b in warmup] + [lambda b=b: step(b, update=False) for b in unseen_widths(warmup, timed)]
    graphed = args.compile and args.compile_mode in CUDA_GRAPH_MODES
    timing = time_steps(warm, [lambda b=b: step(b) for b in timed], device, count_compiles=args.compile,
                        peak_from_start=graphed)
    if args.profile:
        profile_pass(f"{name} + {adapter.name} ({adapter.backend}), {args.mode}",
                     [lambda b=b: step(b, update=False) for b in timed], device, args.profile)
    measured = timing.summary([b.num_tokens for b in timed], [b.num_slots for b in timed])
    if world > 1:  # each rank holds its share of the global mean
        loss = torch.tensor(measured["loss"], device=device)
        torch.distributed.all_reduce(loss)
        measured["loss"] = loss.item()
    return VarlenRecord(
        collate=name, attn=adapter.name, backend=adapter.backend, mode=args.mode, **environment(device),
        preset=args.preset, dtype=args.dtype, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        seed=args.seed, **measured, compile=args.compile, compile_mode=args.compile_mode if args.compile else None,
        static=static, world_size=world, rank=rank(), parallel="none" if world == 1 else ("fsdp2" if args.fsdp else "ddp"),
        sampler=args.sampler, max_tokens=None if args.sampler == "fixed" else args.max_tokens, data=args.data or "synthetic",
        fuse=",".join(sorted(gpt.fuse)) or "none", bf16_weights=shadow is not None, matmul_params=matmul_params(gpt),
        optimizer=args.optimizer if train else None,
    )


def matmul_params(model: torch.nn.Module) -> int:
    """N of the 6·N·T floor: every Linear weight's elements (embeddings are lookups, not GEMMs)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def add_roofline(records: list[VarlenRecord], config: GPTConfig, tokens: int, device: torch.device) -> None:
    """Each row's matmul floor, 6·N·T (train) or 2·N·T (eval) FLOPs over real tokens at the GEMM rate
    measured now at the model's shapes (tokens x dim into the qkv, MLP and projection widths), as a
    fraction of its measured step. Attention FLOPs are not in the floor."""
    d = config.dim
    rate = gemm_tflops(device, [(tokens, d, 3 * d), (tokens, d, 4 * d), (tokens, 4 * d, d), (tokens, d, d)])
    if rate is None:
        return
    for r in records:
        flops = (6 if r.mode == "train" else 2) * r.matmul_params * r.tokens_per_s * r.ms_per_step / 1e3
        r.gemm_tflops = rate
        r.roofline_fraction = flops / (rate * 1e12) / (r.ms_per_step / 1e3)


def setup_label(r: VarlenRecord) -> str:
    """How a row ran: eager or compiled (with its mode), and static shapes if so."""
    how = "eager" if not r.compile else ("compiled" if r.compile_mode in (None, "default") else r.compile_mode)
    how = f"{how}, static" if r.static else how
    how = how if r.fuse == "none" else f"{how}, fuse {r.fuse}"
    return f"{how}, bf16 weights" if r.bf16_weights else how


def table(records: list[VarlenRecord]) -> str:
    header = ["collate", "attn", "backend", "setup", "mode", "ms/step", "real tok/s", "padding", "peak mem", "loss",
              "recompiles", "roofline", f"x {BASELINE}"]
    return format_table(header, [
        [r.collate, r.attn, r.backend, setup_label(r), r.mode, f"{r.ms_per_step:.1f}", f"{r.tokens_per_s:,.0f}",
         f"{100 * r.padding_fraction:.1f}%", gib(r.peak_mem_bytes), f"{r.loss:.5f}", cell(r.recompiles),
         "-" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.0f}%", cell(r.speedup_vs_baseline, ".2f")]
        for r in records
    ])


def run(args: VarlenConfig) -> tuple[list[VarlenRecord], str]:
    """Every requested collate, on this rank: this rank's records and a description of the documents."""
    device = start_distributed(resolve_device(args.device))
    world = world_size()
    args = args.resolved(device)
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards across ranks: run under torchrun --nproc_per_node N with N >= 2")
    if args.static and args.sampler != "pack":
        raise ValueError(f"--static pads every pack to --max-tokens: it needs --sampler pack, got --sampler {args.sampler}")
    if args.bf16_weights and (args.dtype != "bf16" or args.mode != "train"):
        raise ValueError(f"--bf16-weights replaces bf16 autocast's weight casts in training: it needs --dtype bf16 "
                         f"and --mode train, got --dtype {args.dtype} --mode {args.mode}")
    if args.compile_mode != "default" and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compile")
    docs, lengths, config, description = load_documents(args, PRESETS[args.preset], world)
    steps = plan_steps(args, lengths, world, rank())
    names = list(COLLATORS) if args.collate == "all" else [args.collate]
    if args.collate == "all":  # --collate all runs every row it can; an optional package's row says why it cannot
        try:
            block_diagonal_mask_class()
        except ImportError as e:
            names.remove("xformers")
            if rank() == 0:
                print(f"xformers row skipped: {str(e).splitlines()[0]}")
    if not args.no_baseline and BASELINE not in names:
        names.insert(0, BASELINE)
    # The added baseline row runs pad_max with its best adapter, whatever --attn the others use, and
    # eager: the ratio column is against pad_max + sdpa eager; with --compile, every other row compiles.
    added = {n: n == BASELINE and args.collate != BASELINE for n in names}
    # The baseline is the plain seed model: no fused kernels, autocast's weight casts.
    rows = {n: dataclasses.replace(args, attn="auto" if added[n] else args.attn, compile=args.compile and not added[n],
                                   fuse="none" if added[n] else args.fuse,
                                   bf16_weights=args.bf16_weights and not added[n])
            for n in names}
    resolve_fuse(args.fuse)  # a fusion whose kernels do not load fails here, before any timing
    # Fail on a bad --attn/--collate pairing or a missing optional package before any timing.
    for name, row in rows.items():
        get_adapter(row.attn, COLLATORS[name].layout, device)
        make_collator(name, config, row)
    # A row takes seconds to minutes (a CPU's whole run is about a minute): a bar over the rows, and
    # each row's result as soon as it is measured, before the table.
    records = []
    # disable=None: no bar when stderr is not a terminal (a log file, CI), the row lines still print.
    with tqdm(total=len(rows), unit="row", desc="benchmark", disable=True if rank() != 0 else None, file=sys.stderr) as bar:
        for name, row in rows.items():
            bar.set_postfix_str(name)
            r = run_collate(name, row, config, device, docs, steps)
            records.append(r)
            if rank() == 0:
                ranks = "" if world_size() == 1 else f" on rank 0 of {world_size()} (the table sums the ranks)"
                tqdm.write(f"{name} + {r.attn} ({r.backend}): {r.ms_per_step:.1f} ms/step, "
                           f"{r.tokens_per_s:,.0f} real tok/s{ranks}", file=sys.stdout)
            bar.update()
    return records, description


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = VarlenConfig.from_args(parser.parse_args(argv))
    try:
        records, description = run(args)
    except (ValueError, TypeError, ImportError) as e:
        return parser.fail(e)
    command = parser.command(argv)
    world = world_size()
    if world > 1:
        command = f"torchrun --nproc_per_node {world} -m benchmarks.varlen " + command.split(" ", 3)[-1]
    for r in records:
        r.command = command
    shown = records
    if world > 1:  # every rank's rows to rank 0, which merges and writes one file
        this = rank()
        per_rank = gather_records(records)
        shown = [merge_ranks([rows[i] for rows in per_rank]) for i in range(len(records))]
        records = [r for rows in per_rank for r in rows] + shown
        if this != 0:
            return 0
    config = PRESETS[shown[0].preset]
    add_roofline(shown, config, round(shown[0].tokens_per_s * shown[0].ms_per_step / 1e3), torch.device(shown[0].device))
    base = next((r for r in shown if r.collate == BASELINE), None)
    for r in shown:
        r.speedup_vs_baseline = None if base is None else r.tokens_per_s / base.tokens_per_s
    r0 = shown[0]
    print(
        f"device={r0.device} gpu={r0.gpu} torch={r0.torch} preset={r0.preset} dtype={r0.dtype} mode={r0.mode} "
        f"sampler={r0.sampler} batch_size={r0.batch_size} max_tokens={r0.max_tokens} steps={r0.steps} "
        f"warmup={r0.warmup} seed={r0.seed} world_size={r0.world_size} parallel={r0.parallel}"
    )
    print(f"documents: {description}")
    print(table(shown))
    if r0.gemm_tflops is not None:
        print(f"roofline: each row's matmul FLOPs ({'6' if r0.mode == 'train' else '2'}·N·T, N={r0.matmul_params:,}, "
              f"T its real tokens) at {r0.gemm_tflops:.0f} TFLOP/s, this GPU's bf16 GEMM rate at the model's shapes "
              "measured in this run, over its step time")
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_after_distributed(code)
    sys.exit(code)
