"""Seed-size transformers models (GPT-2 or Llama), padded against packed, eager and compiled, on the same documents.

    python -m benchmarks.hf --arch llama --compile   # the compiled comparison: padded, static packs, the peer
    python -m benchmarks.hf                          # GPT-2 train steps, every eager method that runs here
    python -m benchmarks.hf --mode eval --json out.json

The model is the seed article's size with random weights (24 layers, hidden 1024, 16 heads, vocab
1024, 1024 positions, no dropout; Llama with intermediate 4096 and ``--kv-heads`` key/value heads)
in bf16 autocast with SGD. One pool of seed documents (lengths uniform in [1, 1023]) feeds every
row, with ``use_cache=False`` everywhere (a cache is for generation):

- ``pad_max+sdpa``: ``--batch-size`` documents a step padded to 1024, 2-D mask (the baseline);
- ``pad_max+packing_varlen``: the same padded steps through the packed rows' kernels (each padded
  row one 1024-token block of the varlen kernel, -100 at the padding): padding with the same
  kernels, so a table separates what packing buys from what the kernels buy;
- ``pad_longest+sdpa``: the same steps padded to the longest, rounded up to 64;
- ``concat+packing_varlen`` / ``concat+sdpa``: the same steps as one packed row, into this
  project's varlen attention, or into sdpa with a 4-D block-causal mask;
- ``static+packing_varlen``: ``PackingSampler`` packs of at most ``--max-tokens`` tokens and
  ``--max-seqs`` documents, static kwargs (``HFPackedCollator(total_tokens=, max_seqs=, max_seqlen=)``):
  every step the same shapes, so a compiled model compiles once;
- ``static+packing_varlen_repeat_kv``: the same, with k and v repeated to every query head before the
  kernel (what grouped-query attention costs without the kernel's own support; use ``--kv-heads``);
- ``dynamic+packing_varlen``: the same packs unpadded (no ``total_tokens`` tail), the kernel's
  ``max_seqlen`` fixed at 1024, the token and document dimensions marked dynamic: under
  ``--compile`` one dynamic compilation for every pack (its ``recompiles`` over the epoch say
  whether it holds);
- ``flatten+<impl>``: the same packs through transformers' ``DataCollatorWithFlattening``, the peer,
  into ``flash_attention_4|3|2``, whichever loads (else ``packing_varlen``).

``--compile`` runs every method eager and then under ``torch.compile(model)``
(``--compile-mode``), and records each row's dynamo graphs, graph breaks and the compilations after
its first step (recompiles). Ratios: real tokens per second against pad_max + sdpa eager, and for
compiled rows also against pad_max + sdpa compiled, both measured in the same run. Throughput
counts real tokens only. Eval is causal. Each record carries the varlen kernel its layers ran
(``--kernel`` picks one), its peak memory, and its matmul roofline: 6·N·T FLOPs to train (2·N·T
to evaluate; N the model's Linear weights, the LM head included, T its real tokens) at the bf16
GEMM rate measured in the same process at the model's own shapes, over its step time.

``--liger`` puts Liger Kernel's RMSNorm, SwiGLU and RoPE (Triton) into every model but the
baseline's, to measure them against Inductor's own fusion; ``--checkpoint`` turns on activation
checkpointing there (memory for recomputation), and ``--memory-budget`` lets the compiler choose what
to recompute instead. ``--arch`` takes several architectures,
run one after another in one process (the second-model slowdown of issue 24).
"""

from __future__ import annotations

import importlib.util
import sys
import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch

from benchmarks.harness import (
    CUDA_GRAPH_MODES,
    GcClock,
    Parser,
    Record,
    RunConfig,
    cell,
    environment,
    format_table,
    gemm_tflops,
    gib,
    positive,
    resolve_device,
    time_steps,
    write_json,
)
from packing import Batch, PackingSampler, SyntheticDocs, get_collator
from packing.interop.hf import checked_kwargs, pack, shifted_labels
from packing.interop import hf_attention
from packing.kernels.choice import KernelSet

PEER_IMPLEMENTATIONS = ("flash_attention_4", "flash_attention_3", "flash_attention_2")
METHODS = ("pad_max+sdpa", "pad_max+packing_varlen", "pad_longest+sdpa", "concat+packing_varlen", "concat+sdpa",
           "concat+flash_attention_2", "static+packing_varlen", "static+packing_varlen_repeat_kv",
           "dynamic+packing_varlen", "flatten")
BASELINE = METHODS[0]
# Defaults: without --compile, the eager comparison of batch layouts (and flash_attention_2 where its
# package is installed); with it, the compiled recipe against compiled padding and the peer.
EAGER_DEFAULT = ("pad_max+sdpa", "pad_longest+sdpa", "concat+packing_varlen", "concat+sdpa")
COMPILE_DEFAULT = ("pad_max+sdpa", "static+packing_varlen", "flatten")
MAX_LEN = 1024


@dataclass(frozen=True)
class HFConfig(RunConfig):
    """One run of this benchmark (see :func:`build_parser` for each setting)."""

    steps: int = 20
    arch: str = "gpt2"
    compile: bool = False
    methods: tuple[str, ...] | None = None
    batch_size: int = 32
    max_tokens: int = 16384
    max_seqs: int = 256
    layers: int = 24
    dim: int = 1024
    kv_heads: int = 16
    loss: str = "full"
    compiled_only: bool = False
    kernels: tuple[str, ...] = ()  # varlen kernels for the packing_varlen rows, one row each (empty: the default order)
    no_baseline: bool = False
    compile_mode: str = "default"
    liger: bool = False
    checkpoint: bool = False
    memory_budget: float | None = None  # torch.compile's activation memory budget for the compiled rows
    archs: tuple[str, ...] = ()  # every --arch, run in this order in one process (arch: the one running)
    memory_cap_gib: float | None = None
    arch_order: int = 0  # the position of arch in archs (set by run, not a flag)


@dataclass(kw_only=True)
class HFRecord(Record):
    """One row, as written to ``--json``: what ran, and the shared measured fields."""

    method: str
    arch: str
    compiled: bool
    transformers: str
    kernel: str | None  # what packing_varlen ran on CUDA (a flatten row names its implementation in method)
    doc_counts: list[int]  # documents in each timed step
    vocab_size: int = 0
    loss_impl: str = "full"  # "full": the model's loss on its logits; "chunked": packing.interop.hf_loss
    compile_mode: str | None = None
    liger: bool = False  # Liger Kernel's RMSNorm, SwiGLU and RoPE in the model
    checkpoint: bool = False  # activation checkpointing: each layer's activations recomputed in the backward
    memory_budget: float | None = None  # AOTAutograd's activation_memory_budget (None: 1.0, save all it chose to)
    arch_order: int = 0  # which model of this process it was (0: the first); --arch runs several
    matmul_params: int = 0  # N: the model's Linear weights, the LM head included
    gemm_tflops: float | None = None  # the GPU's bf16 GEMM rate at the model's shapes, this process
    roofline_fraction: float | None = None  # 6·N·T (train) / gemm rate, over the measured step
    alloc_retries: int = 0  # the caching allocator's cudaMalloc retries (frees and re-asks) in the timed steps
    gc_ms: float = 0.0  # host time in Python's garbage collector during the timed steps
    gc_objects: int = 0  # objects Python's collector tracked after the row (what earlier models left)
    memory_cap_gib: float | None = None  # the process's CUDA memory cap (an 80 GB H100's, on a bigger GPU)
    speedup_vs_compiled_baseline: float | None = None  # against pad_max+sdpa compiled; speedup_vs_baseline: eager


def build_parser() -> Parser:
    p = Parser(prog="python -m benchmarks.hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=["gpt2"], nargs="+", choices=["gpt2", "llama", "qwen3-0.6b"],
                   help="model architecture (default gpt2); qwen3-0.6b: the Qwen3-0.6B shape with its 151,936-token "
                        "vocabulary (hidden 1024, 28 layers, 16 query / 8 key-value heads of 128, tied head); "
                        "several run one after another in this process")
    p.add_argument("--loss", default="full", choices=["full", "chunked"],
                   help="full: the model's own loss on its (T, vocab) logits; chunked: packing.interop.hf_loss, "
                        "the head and cross-entropy a chunk of tokens at a time (default full)")
    p.add_argument("--kernel", nargs="+", choices=["flash-attn-3", "flash-attn-4", "flash-attn-2", "torch.varlen_attn"],
                   help="the varlen kernel(s) packing_varlen runs, one row each, side by side (default: the first "
                        "that loads, FA3 first)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the pad_max+sdpa rows (no ratios; for a memory or recompile check)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode for the compiled rows; reduce-overhead: CUDA graphs (default: default)")
    p.add_argument("--liger", action="store_true",
                   help="Liger Kernel's RMSNorm, SwiGLU and RoPE in every model but the baseline's (llama, qwen3-0.6b)")
    p.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing (transformers' activation_checkpointing_enable, non-reentrant) in "
                        "every model but the baseline's: each layer recomputed in the backward, for memory")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="torch.compile's activation memory budget for every compiled row but the baseline's, "
                        "in [0, 1): the compiler recomputes the cheapest activations in the backward to keep "
                        "this fraction of them (torch._functorch.config.activation_memory_budget)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap this process's CUDA memory in GiB (78: what an 80 GB H100 leaves after its CUDA context, "
                        "on a larger GPU)")
    HFConfig.add_arguments(p, mode_help="train step (SGD) or forward only", steps_help="timed padded steps per method")
    p.add_argument("--compile", action="store_true", help="run every method eager and under torch.compile")
    p.add_argument("--compiled-only", action="store_true",
                   help="with --compile, skip the eager rows (a model whose eager padded step does not fit)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="rows to run (default: see above)")
    p.add_argument("--batch-size", type=positive, default=32, help="documents per padded step (default 32)")
    p.add_argument("--max-tokens", type=positive, default=16384, help="tokens per pack (default 16384)")
    # 256, not 64: best-fit decreasing places the shortest documents last, and a cap of 64 left them in
    # part-filled packs (this pool of 1,344 seed documents: 93.4% fill at 64, 99.93% at 256).
    p.add_argument("--max-seqs", type=positive, default=256, help="documents per pack at most (default 256)")
    p.add_argument("--layers", type=positive, default=24, help="layers (default 24, the seed model)")
    p.add_argument("--dim", type=positive, default=1024, help="hidden size (default 1024; 16 heads of dim / 16)")
    p.add_argument("--kv-heads", type=positive, default=16, help="Llama key/value heads (default 16; fewer is GQA)")
    return p


def register_repeat_kv() -> str:
    """``packing_varlen_repeat_kv``: packing_varlen with k and v repeated to every query head, the
    way a kernel without grouped-query support must be fed; only for measuring that cost."""
    from transformers import AttentionInterface

    from packing.interop.hf_attention import varlen_attention

    def repeat_kv(module, query, key, value, *args, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(group, dim=1) for t in (key, value))  # (1, H, T, D)
        return varlen_attention(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("packing_varlen_repeat_kv", repeat_kv)
    return "packing_varlen_repeat_kv"


def build_config(args: HFConfig, attn_implementation: str):
    """The benchmark model's config: what hf_kwargs checks and reads the masks' windows from."""
    import transformers

    if args.arch == "qwen3-0.6b":
        return transformers.Qwen3Config(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=MAX_LEN,
            attention_dropout=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)
    if args.arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=1024, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.layers,
            num_attention_heads=16, num_key_value_heads=args.kv_heads, max_position_embeddings=MAX_LEN,
            attention_dropout=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)
    return transformers.GPT2Config(
        vocab_size=1024, n_positions=MAX_LEN, n_embd=args.dim, n_layer=args.layers, n_head=16, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)


def build_model(args: HFConfig, attn_implementation: str):
    import transformers

    torch.manual_seed(args.seed)  # the same weights for every row
    config = build_config(args, attn_implementation)
    if args.arch == "qwen3-0.6b":
        return transformers.Qwen3ForCausalLM(config)
    if args.arch == "llama":
        return transformers.LlamaForCausalLM(config)
    model = transformers.GPT2LMHeadModel(config)
    # transformers recognises no loss_type for GPT2LMHeadModel and logs a warning on every call,
    # which breaks a compiled graph (transformers 5.17 and 5.23); name the loss it falls back to.
    model.loss_type = "ForCausalLM"
    return model


def padded_kwargs(batch: Batch) -> dict[str, Any]:
    """transformers' kwargs for a padded batch: a 2-D mask and labels shifted right, -100 at padding."""
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.long(),
            "labels": shifted_labels(batch), "shift_labels": batch.labels, "use_cache": False}


def peer_implementation(device: torch.device) -> str:
    """The first of transformers' own varlen implementations that loads here, else packing_varlen."""
    import transformers

    if device.type == "cuda":
        for impl in PEER_IMPLEMENTATIONS:
            try:
                transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=8,
                                                                     attn_implementation=impl))
            except (ImportError, ValueError):  # transformers refuses one whose package is missing
                continue
            return impl
    return "packing_varlen"


@dataclass
class Plan:
    """What a method runs: the model's attention implementation, its steps (host batches or peer
    dicts, pinned), how a step becomes the model's kwargs on the device, and each step's counts."""

    impl: str
    steps: list[Any]
    kwargs: Callable[[Any, torch.device], dict[str, Any]]
    real_tokens: list[int]
    slots: list[int]
    doc_counts: list[int]


def plan(method: str, args: HFConfig, device: torch.device, docs: SyntheticDocs, fixed: list[list[int]],
         packs: list[list[int]]) -> Plan:
    layout, _, impl = method.partition("+")
    pin = device.type == "cuda"
    if layout == "flatten":
        from transformers import DataCollatorWithFlattening

        impl = peer_implementation(device)
        collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
        # Its own convention: labels from input_ids, so each document's last target (which our
        # (inputs, targets) samples carry) is not trained; the computed positions are the same.
        steps = [collate([{"input_ids": docs[i][0].tolist()} for i in pack]) for pack in packs]
        if pin:
            steps = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in s.items()} for s in steps]
        counts = [int(sum(docs.lengths[i] for i in pack)) for pack in packs]

        def peer_kwargs(step: dict[str, Any], device: torch.device) -> dict[str, Any]:
            moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in step.items()}
            return {**moved, "use_cache": False}

        return Plan(impl, steps, peer_kwargs, counts, counts, [len(p) for p in packs])
    if layout == "pad_max" and impl == "packing_varlen":
        return padded_varlen_plan(args, device, docs, fixed)
    if layout == "static":
        collate = get_collator("concat", total_tokens=args.max_tokens, max_seqs=args.max_seqs, max_seqlen=MAX_LEN)
        groups = packs
    elif layout == "dynamic":
        collate, groups = get_collator("concat"), packs
    else:
        collate = {"pad_max": get_collator("pad_max", max_len=MAX_LEN),
                   "pad_longest": get_collator("pad_longest", pad_to_multiple_of=64),
                   "concat": get_collator("concat")}[layout]
        groups = fixed
    batches = [collate([docs[i] for i in group]) for group in groups]
    if pin:
        batches = [b.pin_memory() for b in batches]
    name = "packing_varlen" if impl == "packing_varlen_repeat_kv" else impl  # the kwargs it reads
    target = name if name == "packing_varlen" else build_config(args, name)  # sdpa/eager masks read the config

    def batch_kwargs(batch: Batch, device: torch.device) -> dict[str, Any]:
        batch = batch.to(device, non_blocking=True)
        if batch.layout == "padded":
            return padded_kwargs(batch)
        kwargs = checked_kwargs(batch, target)
        if layout == "dynamic":
            # A fixed bound, as the static rows have: the kernels take max_seqlen as a host int, and
            # each new longest document would be one more value for the compiled graph to guard on.
            kwargs["max_length_q"] = kwargs["max_length_k"] = MAX_LEN
            mark_dynamic(kwargs)
        return kwargs

    return Plan(impl, batches, batch_kwargs, [b.num_tokens for b in batches], [b.num_slots for b in batches],
                [len(b.seq_lens) for b in batches])


def mark_dynamic(kwargs: dict[str, Any]) -> None:
    """Mark the token dimension of every (1, T) tensor and the document dimension of the boundaries
    dynamic, so the first compilation is the dynamic one. Left to automatic dynamic shapes, a
    compiled Llama recompiled twice over an epoch of packs (CPU, torch 2.13): once when the token
    count changed, and again when the document count first changed, which the first recompile had
    kept static."""
    for key, value in kwargs.items():
        if torch.is_tensor(value):
            torch._dynamo.mark_dynamic(value, 0 if key.startswith("cu_seq_lens") else 1)


def padded_varlen_plan(args: HFConfig, device: torch.device, docs: SyntheticDocs, fixed: list[list[int]]) -> Plan:
    """``pad_max+packing_varlen``: each padded step as one packed row of ``--batch-size`` blocks of
    1024 tokens (a document and its padding, the padding's targets -100), through the varlen kernel.
    The same positions as pad_max are computed, and the same targets learnt: only the kernels change."""
    def padded(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = docs[i]
        tail = MAX_LEN - len(inputs)
        return (torch.cat([inputs, inputs.new_zeros(tail)]), torch.cat([targets, targets.new_full((tail,), -100)]))

    size = args.batch_size * MAX_LEN
    collate = get_collator("concat", total_tokens=size, max_seqs=args.batch_size, max_seqlen=MAX_LEN)
    batches = [collate([padded(i) for i in group]) for group in fixed]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    def batch_kwargs(batch: Batch, device: torch.device) -> dict[str, Any]:
        return checked_kwargs(batch.to(device, non_blocking=True), "packing_varlen")

    real = [int(sum(docs.lengths[i] for i in group)) for group in fixed]
    return Plan("packing_varlen", batches, batch_kwargs, real, [size] * len(fixed), [len(g) for g in fixed])


def warmup_steps(args: HFConfig, compiled: bool) -> int:
    """Untimed steps before the clock: ``--warmup``, and at least one for a compiled row (it compiles)."""
    return max(args.warmup, 1) if compiled else args.warmup


def loss_function(model: Any, loss: str) -> Callable[..., torch.Tensor]:
    """kwargs -> the step's loss: the model's own (``full``), or ``packing.interop.hf_loss``'s chunked
    head and cross-entropy (``chunked``). Liger Kernel's fused linear cross-entropy was tried here
    and removed: compiled on static packs it gave another loss than the model's own on the same
    pack (issue 24's record, benchmarks/results/transformers/2026-12-01-h200-qwen3-levers)."""
    if loss == "chunked":
        from packing.interop.hf_loss import causal_lm_loss

        return lambda **kwargs: causal_lm_loss(model, kwargs)
    return lambda **kwargs: model(**kwargs).loss


LIGER_FAMILIES = {"llama": "llama", "qwen3-0.6b": "qwen3"}  # --arch: Liger Kernel's patch for it


@contextlib.contextmanager
def liger_kernels(model: Any, arch: str) -> Iterator[None]:
    """Liger Kernel's RMSNorm, SwiGLU MLP and RoPE in ``model`` (its own instance patching), with the
    transformers module globals Liger also rebinds put back afterwards, so later rows stay plain."""
    import importlib

    from liger_kernel.transformers import monkey_patch

    family = LIGER_FAMILIES[arch]
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    saved = dict(vars(module))
    getattr(monkey_patch, f"apply_liger_kernel_to_{family}")(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def run_method(method: str, compiled: bool, args: HFConfig, device: torch.device, p: Plan,
               kernel: str | None = None) -> HFRecord:
    """One row: ``method``'s model and steps, eager or ``compiled``; ``kernel`` names the one varlen
    kernel a packing_varlen model runs (None: the first that computes each layer)."""
    import gc

    import transformers

    model = build_model(args, p.impl).to(device)
    if p.impl == "packing_varlen":
        pack(model, kernels=None if kernel is None else [kernel])  # checked, and its kernels its own
    train = args.mode == "train"
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    bf16 = device.type == "cuda"
    liger = args.liger and method != BASELINE
    checkpoint = args.checkpoint and method != BASELINE
    if checkpoint:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24; the other name is deprecated there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        torch._dynamo.reset()  # each row compiles from scratch, its counts its own
    budget = args.memory_budget if compiled and method != BASELINE else None
    loss_of = loss_function(model, args.loss)
    forward = torch.compile(loss_of, mode=None if args.compile_mode == "default" else args.compile_mode) if compiled \
        else loss_of
    graphed = compiled and args.compile_mode in CUDA_GRAPH_MODES

    def step(host: Any) -> torch.Tensor:
        kwargs = p.kwargs(host, device)
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if not train:
                with torch.inference_mode():
                    loss = forward(**kwargs)
                # a CUDA graph's output is overwritten by its next run: keep a copy for the record
                return loss.clone() if graphed else loss
            loss = forward(**kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone() if graphed else loss.detach()

    warm = warmup_steps(args, compiled)
    timed = range(warm, len(p.steps))
    retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0
    hf_attention.last_kernel = None
    # The partitioner reads the budget when the warm-up step compiles the backward.
    budgeted = torch._functorch.config.patch(activation_memory_budget=budget) if budget is not None \
        else contextlib.nullcontext()
    with liger_kernels(model, args.arch) if liger else contextlib.nullcontext(), budgeted, GcClock() as gc_clock:
        timing = time_steps([lambda h=h: step(h) for h in p.steps[:warm]],
                            [lambda i=i: step(p.steps[i]) for i in timed], device, count_compiles=compiled,
                            before_timed=gc_clock.reset,  # the collector's time in the timed steps only
                            peak_from_start=graphed)
    retries = (torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries) if device.type == "cuda" else 0
    return HFRecord(
        method=method if not method == "flatten" else f"flatten+{p.impl}", arch=args.arch, mode=args.mode,
        compiled=compiled, **environment(device), transformers=transformers.__version__,
        kernel=hf_attention.last_kernel if "packing_varlen" in p.impl else None,
        batch_size=args.batch_size, steps=len(timed), warmup=warm, seed=args.seed,
        doc_counts=[p.doc_counts[i] for i in timed], vocab_size=model.config.vocab_size, loss_impl=args.loss,
        compile_mode=args.compile_mode if compiled else None, liger=liger, checkpoint=checkpoint,
        memory_budget=budget,
        arch_order=args.arch_order,
        matmul_params=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        alloc_retries=retries, gc_ms=1000 * gc_clock.seconds, gc_objects=len(gc.get_objects()),
        memory_cap_gib=args.memory_cap_gib,
        **timing.summary([p.real_tokens[i] for i in timed], [p.slots[i] for i in timed]),
    )


def run(args: HFConfig) -> list[HFRecord]:
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("benchmarks.hf needs transformers: pip install -e '.[hf]'")

    device = resolve_device(args.device)
    fa2 = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    eager_default = EAGER_DEFAULT + (("concat+flash_attention_2",) if fa2 else ())
    methods = list(args.methods or (COMPILE_DEFAULT if args.compile else eager_default))
    if "concat+flash_attention_2" in methods and not fa2:
        raise ValueError("concat+flash_attention_2 needs CUDA and the flash-attn package; leave it out of --methods")
    if args.compiled_only and not args.compile:
        raise ValueError("--compiled-only skips the eager rows of --compile: give --compile too")
    if BASELINE not in methods and not args.no_baseline:
        methods.insert(0, BASELINE)
    # Options that would change nothing in the rows asked for are refused, never dropped.
    if args.compile_mode != "default" and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode} sets how the compiled rows compile; give --compile too")
    varlen_rows = [m for m in methods if "packing_varlen" in m]
    if args.kernels and not varlen_rows:
        raise ValueError(f"--kernel picks the kernel of the packing_varlen rows, and none of {methods} is one; add "
                         "one (static+packing_varlen) or leave out --kernel")
    for flag, on in (("--liger", args.liger), ("--checkpoint", args.checkpoint)):
        if on and methods == [BASELINE]:
            raise ValueError(f"{flag} applies to every row but the baseline, and only the baseline ({BASELINE}) runs; "
                             "add a row with --methods or leave it out")
    if args.memory_budget is not None:
        if not args.compile:
            raise ValueError(f"--memory-budget {args.memory_budget} is torch.compile's; give --compile too")
        if not 0 <= args.memory_budget < 1:
            raise ValueError(f"--memory-budget {args.memory_budget}: expected a fraction in [0, 1) (1 is the default, "
                             "nothing recomputed); e.g. --memory-budget 0.5")
        if args.mode != "train" or methods == [BASELINE]:
            raise ValueError(f"--memory-budget {args.memory_budget} trades the backward's saved activations of every "
                             "row but the baseline; it needs --mode train and a row besides the baseline")
    if args.checkpoint and args.mode != "train":
        raise ValueError(f"--checkpoint recomputes activations in the backward; --mode {args.mode} has none: "
                         "use --mode train or leave out --checkpoint")
    plain = [a for a in args.archs or (args.arch,) if a not in LIGER_FAMILIES]
    if args.liger and plain:
        raise ValueError(f"--liger takes --arch {' or '.join(LIGER_FAMILIES)}, got {plain[0]!r} (Liger Kernel has no "
                         "patch for it); leave out --liger")
    if args.liger and importlib.util.find_spec("liger_kernel") is None:
        raise ImportError("--liger needs Liger Kernel: pip install liger-kernel")
    for kernel in args.kernels:
        KernelSet.load([kernel])  # a ValueError naming what loads, before any row runs
    hf_attention.implementation_for(None)  # packing_varlen's kernels, resolved before any compiled step
    register_repeat_kv()
    if args.memory_cap_gib is not None:
        if device.type != "cuda":
            raise ValueError(f"--memory-cap-gib {args.memory_cap_gib} caps CUDA memory; this run is on {device.type}")
        total = torch.cuda.get_device_properties(device).total_memory
        if not 0 < args.memory_cap_gib * 2**30 <= total:
            raise ValueError(f"--memory-cap-gib {args.memory_cap_gib}: expected between 0 and this GPU's "
                             f"{total / 2**30:.1f} GiB")
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total, index)
    records = []
    for order, arch in enumerate(args.archs or (args.arch,)):
        records += run_arch(replace(args, arch=arch, arch_order=order), device, methods)
    return records


def run_arch(args: HFConfig, device: torch.device, methods: list[str]) -> list[HFRecord]:
    """Every method's rows for ``args.arch``, with their ratios against this arch's baseline and
    their roofline against the GEMM rate measured now at this model's shapes."""
    n = (args.warmup + args.steps) * args.batch_size
    docs = SyntheticDocs(n, max_len=MAX_LEN, vocab_size=1024, seed=args.seed)
    fixed = [list(range(i, i + args.batch_size)) for i in range(0, n, args.batch_size)]
    # The same documents in packs: one epoch of PackingSampler over the pool, in its (shuffled) order.
    packs = [list(p) for p in PackingSampler(docs.lengths, max_tokens=args.max_tokens, max_seqs=args.max_seqs,
                                             seed=args.seed, num_replicas=1, rank=0)]
    plans = {method: plan(method, args, device, docs, fixed, packs) for method in methods}
    warm = warmup_steps(args, args.compile)
    for method, p in plans.items():
        if len(p.steps) <= warm:
            raise ValueError(
                f"{method} has {len(p.steps)} steps ({n} documents), none left to time after {warm} warm-up "
                "step(s); raise --steps or lower --max-tokens"
            )
    records = []
    for method, p in plans.items():
        kernels = args.kernels if "packing_varlen" in p.impl and args.kernels else (None,)
        for kernel in kernels:
            for compiled in ((True,) if args.compiled_only else (False, True)) if args.compile else (False,):
                records.append(run_method(method, compiled, args, device, p, kernel))
                r = records[-1]
                print(f"done: {r.arch} {r.method} {'compiled' if compiled else 'eager'} {r.kernel or ''}: "
                      f"{r.tokens_per_s:,.0f} real tok/s, {r.ms_per_step:.1f} ms/step, peak {gib(r.peak_mem_bytes)}, "
                      f"first step {r.first_step_s:.1f} s, recompiles {r.recompiles}", file=sys.stderr, flush=True)
    base = {r.compiled: r for r in records if r.method == BASELINE}
    for r in records:
        r.speedup_vs_baseline = r.tokens_per_s / base[False].tokens_per_s if False in base else None
        if r.compiled and True in base:
            r.speedup_vs_compiled_baseline = r.tokens_per_s / base[True].tokens_per_s
    with torch.device("meta"):
        shapes = {(m.in_features, m.out_features) for m in build_model(args, "sdpa").modules()
                  if isinstance(m, torch.nn.Linear)}
    rate = gemm_tflops(device, [(args.max_tokens, k, n) for k, n in sorted(shapes)])
    if rate is not None:
        for r in records:
            r.gemm_tflops = rate
            r.roofline_fraction = (6 if r.mode == "train" else 2) * r.matmul_params * r.tokens_per_s / (rate * 1e12)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parsed = parser.parse_args(argv)
    args = HFConfig.from_args(parsed, methods=tuple(parsed.methods) if parsed.methods else None, arch=parsed.arch[0],
                              archs=tuple(parsed.arch), kernels=tuple(parsed.kernel or ()))
    try:
        records = run(args)
    except (ValueError, TypeError, ImportError) as e:
        return parser.fail(e)
    command = parser.command(argv)
    r0 = records[0]
    print(f"gpu={r0.gpu} torch={r0.torch} transformers={r0.transformers} mode={r0.mode} loss={args.loss} "
          f"compile_mode={args.compile_mode} liger={args.liger} padded batch_size={r0.batch_size} "
          f"max_tokens={args.max_tokens} kernels={r0.kernels}"
          + (f" memory_cap={args.memory_cap_gib} GiB" if args.memory_cap_gib else ""))
    if r0.gemm_tflops is not None:
        print(f"roofline: 6·N·T train (2·N·T eval) FLOPs, N the Linear weights (LM head included), T real tokens, "
              f"at {r0.gemm_tflops:.0f} TFLOP/s, the bf16 GEMM rate measured now at the model's shapes")
    header = ["arch", "method", "how", "kernel", "steps", "docs/step", "ms/step", "real tok/s", "padding", "peak mem",
              "loss", "graphs", "recompiles", "x pad eager", "x pad compiled", "roofline"]
    print(format_table(header, [
        [f"{r.arch}#{r.arch_order}" if len(args.archs) > 1 else r.arch,
         r.method + (" +liger" if r.liger else "") + (" +checkpoint" if r.checkpoint else "")
         + (f" +budget {r.memory_budget}" if r.memory_budget is not None else ""),
         ("compiled" if r.compile_mode == "default" else r.compile_mode) if r.compiled else "eager",
         r.kernel or "-", r.steps, f"{min(r.doc_counts)}-{max(r.doc_counts)}",
         f"{r.ms_per_step:.1f}", f"{r.tokens_per_s:,.0f}",
         f"{100 * r.padding_fraction:.1f}%", gib(r.peak_mem_bytes), f"{r.loss:.4f}", cell(r.graphs), cell(r.recompiles),
         cell(r.speedup_vs_baseline, ".2f"), cell(r.speedup_vs_compiled_baseline, ".2f"),
         "-" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.0f}%"]
        for r in records
    ]))
    for r in records:
        r.command = command
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
