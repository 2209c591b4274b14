"""What every benchmark entry point composes: the run configuration, the step timer, the shared
record, the distributed set-up, profiling and the table.

A benchmark builds a frozen :class:`RunConfig` subclass from its parser, makes a zero-argument
callable per step, and hands them to :func:`time_steps`, which runs the untimed steps, times the
rest without syncing inside the loop and returns a :class:`Timing`. ``Timing.summary`` turns that
into the fields every :class:`Record` carries, so two benchmarks measure the same way.

Example (on a CPU, the host clock):
    >>> import torch
    >>> steps = [lambda: torch.ones(()) for _ in range(3)]
    >>> t = time_steps(steps[:1], steps[1:], torch.device("cpu"))
    >>> len(t.step_ms), t.summary(real_tokens=[10, 10], slots=[20, 20])["padding_fraction"]
    (2, 0.5)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from packing.cli import Parser
from packing.distributed import is_distributed, world_size

__all__ = [
    "Parser", "RunConfig", "Record", "StepClock", "Timing", "cell", "environment", "format_table", "gib",
    "merge_ranks", "write_json",
    "non_negative", "positive", "profile_pass", "resolve_device", "start_distributed", "sync", "time_steps",
    "wrap_data_parallel", "gather_records", "exit_after_distributed", "dynamo_counts",
]


# -- the command line -------------------------------------------------------------------------------

def positive(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def non_negative(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def resolve_device(name: str | None) -> torch.device:
    """``--device``: cuda if available when not given; a clear ValueError for one that cannot run."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    return device


@dataclass(frozen=True)
class RunConfig:
    """The settings every benchmark run shares; a benchmark subclasses it with its own. Frozen: a
    row that runs differently is a ``dataclasses.replace`` of the run's config, never a mutation."""

    device: str | None = None
    mode: str = "train"
    steps: int = 10
    warmup: int = 2
    seed: int = 0
    json: str | None = None

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser, *, mode_help: str, steps_help: str) -> None:
        """The shared options, with this config's defaults: --device, --mode, --steps, --warmup,
        --seed, --json."""
        p.add_argument("--device", help="cuda if available, else cpu")
        p.add_argument("--mode", default=cls.mode, choices=["train", "eval"], help=mode_help)
        p.add_argument("--steps", type=positive, default=cls.steps, help=f"{steps_help} (default {cls.steps})")
        p.add_argument("--warmup", type=non_negative, default=cls.warmup, help=f"untimed steps first (default {cls.warmup})")
        p.add_argument("--seed", type=int, default=cls.seed, help=f"documents and model weights (default {cls.seed})")
        p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any):
        """The config from parsed arguments (an argument per field, same name)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


# -- timing -----------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
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


class GcClock:
    """Host time Python's garbage collector takes while the clock is entered (``gc.callbacks``).

    Example:
        >>> import gc
        >>> with GcClock() as clock:
        ...     _ = gc.collect()
        >>> clock.seconds > 0
        True
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    def _tick(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self._tick)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._tick)


def dynamo_counts() -> tuple[int, int, int]:
    """(graphs, graph breaks, frames compiled) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), counters["frames"]["total"]


@dataclass(frozen=True)
class Timing:
    """What :func:`time_steps` measured.

    step_ms: each timed step's time; total_s: first timed step's start to the last one's end;
    first_step_s: wall time of the first untimed step (a compiled model compiles there; 0 without
    warm-up); losses: each timed step's return value; peak_mem_bytes: CUDA peak over the timed
    steps; graphs, graph_breaks, recompiles: dynamo's counts for the run (recompiles: frames compiled
    after the first step), None unless asked for.
    """

    step_ms: list[float]
    total_s: float
    first_step_s: float
    losses: list[torch.Tensor]
    peak_mem_bytes: int | None
    graphs: int | None = None
    graph_breaks: int | None = None
    recompiles: int | None = None

    def summary(self, real_tokens: Sequence[int], slots: Sequence[int]) -> dict[str, Any]:
        """The :class:`Record` fields for timed steps of ``real_tokens`` real tokens in ``slots``
        computed positions each: mean and median step time, real tokens per second (overall and the
        median step's), padding, peak memory, mean loss and the compile counts."""
        n = len(self.step_ms)
        return dict(
            ms_per_step=1000 * self.total_s / n,
            median_ms_per_step=statistics.median(self.step_ms),
            tokens_per_s=sum(real_tokens) / self.total_s,
            median_tokens_per_s=statistics.median(1000 * r / ms for r, ms in zip(real_tokens, self.step_ms)),
            first_step_s=self.first_step_s,
            padding_fraction=1 - sum(real_tokens) / sum(slots),
            peak_mem_bytes=self.peak_mem_bytes,
            loss=torch.stack(self.losses).float().mean().item(),
            graphs=self.graphs, graph_breaks=self.graph_breaks, recompiles=self.recompiles,
        )


# torch.compile modes that record CUDA graphs: their activations are allocated while a graph is
# recorded in the warm-up, so a row compiled with one measures its peak with peak_from_start.
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def time_steps(warm: Sequence[Callable[[], Any]], timed: Sequence[Callable[[], torch.Tensor]],
               device: torch.device, *, count_compiles: bool = False,
               before_timed: Callable[[], Any] | None = None, peak_from_start: bool = False) -> Timing:
    """Run ``warm`` untimed (the first on the wall clock), then time each of ``timed``.

    Each step is a zero-argument callable returning its loss (a detached tensor). Nothing syncs
    inside the timed loop: the clock reads CUDA events after one final synchronize, so the GPU's
    queue never drains between steps. ``count_compiles`` clears dynamo's counters first and records
    the graphs, graph breaks and compilations after the first step. ``before_timed`` runs once,
    after the warm-up's final synchronize and before the first timed step.

    The peak memory is that of the timed steps, so a compilation's own buffers are left out.
    ``peak_from_start`` counts the warm-up too: a CUDA graph allocates its activations while it is
    recorded there, and its replays allocate nothing. Measured on an H200 (Qwen3-0.6B shape, 16k
    packs): the timed replays alone read 2.22 GiB, against 29.46 GiB for the same step uncaptured.
    """
    if not timed:
        raise ValueError("no steps to time; raise --steps")
    if count_compiles:
        from torch._dynamo.utils import counters

        counters.clear()
    if peak_from_start and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if warm:
        warm[0]()
        sync(device)
    first_step_s = time.perf_counter() - start
    frames_after_first = dynamo_counts()[2] if count_compiles else 0
    for step in warm[1:]:
        step()
    sync(device)
    if device.type == "cuda" and not peak_from_start:
        torch.cuda.reset_peak_memory_stats(device)
    if before_timed is not None:
        before_timed()
    clock, losses = StepClock(device), []
    for step in timed:
        with clock:
            losses.append(step())
    sync(device)
    counts: dict[str, int] = {}
    if count_compiles:
        graphs, breaks, frames = dynamo_counts()
        counts = dict(graphs=graphs, graph_breaks=breaks, recompiles=frames - frames_after_first)
    return Timing(step_ms=clock.step_ms(), total_s=clock.total_s(), first_step_s=first_step_s, losses=losses,
                  peak_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None, **counts)


# -- the record -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Record:
    """The fields every benchmark row shares, as written to ``--json``; a benchmark subclasses it
    with the fields that say what the row ran. The measured ones come from :meth:`Timing.summary`."""

    mode: str
    device: str
    gpu: str | None
    torch: str
    kernels: dict[str, str]  # the optional kernel packages that loaded, with versions (packing.kernels.loaded)
    batch_size: int | None
    steps: int
    warmup: int
    seed: int
    ms_per_step: float
    median_ms_per_step: float
    tokens_per_s: float
    median_tokens_per_s: float  # real tokens / time of each timed step, the median: steady state
    first_step_s: float  # wall time of the first untimed step, a compilation included
    padding_fraction: float
    peak_mem_bytes: int | None
    loss: float
    graphs: int | None = None  # dynamo graphs compiled for the row (None: eager)
    graph_breaks: int | None = None
    recompiles: int | None = None  # dynamo compilations after the row's first step
    speedup_vs_baseline: float | None = None
    command: str = ""


def gemm_tflops(device: torch.device, shapes: Sequence[tuple[int, int, int]], *, repeats: int = 20) -> float | None:
    """The GPU's measured bf16 GEMM rate on ``shapes`` (M, K, N), in TFLOP/s: each product timed
    ``repeats`` times with CUDA events after a warm-up, all the FLOPs over all the time. None on a CPU.

    The floor of a step is its matmul FLOPs at this rate (6·N·T to train, 2·N·T to evaluate), so
    it is measured in the same run, at the model's own shapes, not taken from a data sheet.
    """
    if device.type != "cuda":
        return None
    pairs = [(torch.randn(m, k, device=device, dtype=torch.bfloat16), torch.randn(k, n, device=device, dtype=torch.bfloat16))
             for m, k, n in shapes]
    for a, b in pairs:
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        for a, b in pairs:
            a @ b
    end.record()
    torch.cuda.synchronize(device)
    flops = 2 * repeats * sum(m * k * n for m, k, n in shapes)
    return flops / (start.elapsed_time(end) * 1e-3) / 1e12


def environment(device: torch.device) -> dict[str, Any]:
    """The record fields that say where a row ran: device type, GPU name, torch version, and the
    optional kernels that loaded (each row's ``backend`` says which one it ran)."""
    from models.kernels import loaded

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(device=device.type, gpu=gpu, torch=torch.__version__, kernels=loaded() if device.type == "cuda" else {})


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(c) for c in col) for col in zip(*cells)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cell(value: Any, spec: str = "") -> str:
    """A table cell: ``value`` formatted with ``spec``, or "-" for None."""
    return "-" if value is None else format(value, spec)


def gib(num_bytes: int | None) -> str:
    """Bytes as a GiB cell, "-" for None (no CUDA peak on a CPU)."""
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def write_json(path: str | None, records: Sequence[Any]) -> None:
    """Write the records (dataclasses) as a JSON list to ``path``, if given."""
    if path:
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in records], f, indent=2)


def profile_pass(title: str, steps: Sequence[Callable[[], Any]], device: torch.device, path: str) -> None:
    """Profile one untimed pass over ``steps`` and append the top ops by device (or CPU) time to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in steps:
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"## {title}: {len(steps)} steps\n{prof.key_averages().table(sort_by=sort, row_limit=25)}\n")


# -- several ranks ----------------------------------------------------------------------------------

def start_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1), join the process group (NCCL on CUDA, gloo on CPU) and
    return this rank's device; alone, ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap_data_parallel(model: torch.nn.Module, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2 with one shard unit per block (``model.blocks``). Batches are moved by hand
    (device_ids=None), so DDP never rebuilds the batch dataclass."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=None)


def merge_ranks(records: list[Record]) -> Record:
    """One row for the whole job from each rank's row: tokens/s summed over ranks, the slowest
    rank's step time, padding over all ranks' tokens, the largest peak memory."""
    tokens = [r.tokens_per_s * r.ms_per_step * r.steps / 1000 for r in records]  # real tokens per rank
    slots = [t / (1 - r.padding_fraction) for t, r in zip(tokens, records)]
    mems = [r.peak_mem_bytes for r in records if r.peak_mem_bytes is not None]
    return dataclasses.replace(
        records[0], rank=None, tokens_per_s=sum(r.tokens_per_s for r in records),
        median_tokens_per_s=sum(r.median_tokens_per_s for r in records),
        ms_per_step=max(r.ms_per_step for r in records), median_ms_per_step=max(r.median_ms_per_step for r in records),
        padding_fraction=1 - sum(tokens) / sum(slots), peak_mem_bytes=max(mems) if mems else None,
        gpu=", ".join(sorted({r.gpu for r in records if r.gpu})) or None)


def gather_records(records: list[Record]) -> list[list[Record]]:
    """Every rank's records, on every rank (rank order), then leave the process group together."""
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, [dataclasses.asdict(r) for r in records])
    kind = type(records[0])
    torch.distributed.barrier()  # teardown together: gloo can abort a rank that exits mid-teardown
    torch.distributed.destroy_process_group()
    return [[kind(**d) for d in rows] for rows in gathered]


def run_under_torchrun(parser: Parser, args, run, *, module: str, cpu_fix: str) -> int:
    """The end of a torchrun benchmark's ``main``: outside torchrun, or ``--device cuda`` without a
    GPU, a one-line error and exit 2 (``cpu_fix`` says what to run instead); then ``run(args,
    parser)`` and leave without finalisation (:func:`exit_after_distributed`). A ``ValueError`` it
    raises is a user error: one line, exit 2."""
    if "WORLD_SIZE" not in os.environ:
        parser.error(f"{module} runs under torchrun: torchrun --nproc-per-node N -m {module} --device {args.device}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but no CUDA device is visible; {cpu_fix}")
    try:
        exit_after_distributed(run(args, parser))
    except ValueError as e:
        return parser.fail(e)
    return 0


def exit_after_distributed(code: int) -> None:
    """Leave a torchrun worker without Python finalisation.

    After a clean barrier and destroy_process_group, gloo's C++ threads can still hold tensors whose
    release at interpreter shutdown aborts the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#179291). Everything is written and flushed by then, so skipping
    finalisation loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

