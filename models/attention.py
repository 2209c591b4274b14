"""Attention adapters: one small class per kernel, each declaring the batch layouts it takes.

Every adapter computes ``softmax(q kᵀ / sqrt(D)) v`` within each sequence of a
:class:`~packing.batch.Batch`, never across sequences and never over padding, and takes q, k, v in
the layout's dense token form (``Batch.unwrap``):

- ``padded``: (B, L, H, D), right-padded rows;
- ``packed``: (T, H, D), sequences back to back, slots past ``cu_seqlens[-1]`` are padding;
- ``nested``: (N, H, D), the jagged values, sequence boundaries at ``cu_seqlens``.

It returns the output in the same shape as q. Adding an adapter means writing one class with
``name``, ``layouts`` and ``attend``, and one line in :data:`ADAPTERS`.

=================  ========  ===================================================  ============
adapter            layout    kernel (``backend``)                                 devices
=================  ========  ===================================================  ============
``flash``          packed    flash-attn-4, flash-attn-2 or torch.varlen_attn      CUDA
``xformers``       packed    xFormers or mslk ``memory_efficient_attention``      CUDA
``sdpa_nested``    nested    SDPA on jagged NestedTensors                          CUDA; CPU bidirectional
``sdpa``           padded    ``F.scaled_dot_product_attention``                   CUDA, CPU
``flex``           packed    ``flex_attention`` + document BlockMask              CUDA; CPU forward only
``naive``          any       explicit fp32 softmax per sequence (ground truth)    CUDA, CPU
=================  ========  ===================================================  ============

Example:
    >>> import torch
    >>> from packing import get_collator
    >>> batch = get_collator("concat")([[5, 6, 7], [8, 9]])
    >>> q = k = v = torch.randn(batch.num_slots, 2, 4)  # (T, H, D)
    >>> get_adapter("naive", batch.layout, "cpu")(q, k, v, batch, causal=True).shape
    torch.Size([5, 2, 4])
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from itertools import accumulate
from types import ModuleType
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from models.block_mask import document_block_mask
from packing.batch import LAYOUTS, Batch


class AttentionAdapter:
    """The interface. Subclasses set ``name`` and ``layouts`` and implement :meth:`attend`.

    ``devices`` are where it can run at all; ``preferred_on`` where ``"auto"`` may pick it (a CPU
    fallback that is slower than another adapter stays out of ``auto``). :meth:`unsupported`
    names a case the adapter cannot compute, which raises a ``ValueError`` instead of running.
    """

    name: ClassVar[str]
    layouts: ClassVar[frozenset[str]]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    preferred_on: ClassVar[frozenset[str] | None] = None  # None: wherever it is available
    needs: ClassVar[str] = "nothing beyond torch"  # said when it is not available
    # True when padding keys are read with weight 0: a non-finite value there would then reach real
    # outputs as 0 x NaN. Padding slots hold the embedded pad id, which is finite.
    reads_padding: ClassVar[bool] = False

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    @classmethod
    def available(cls, device: torch.device) -> bool:
        """Whether this adapter can run on ``device`` in this environment."""
        return device.type in cls.devices

    @classmethod
    def preferred(cls, device: torch.device) -> bool:
        """Whether ``"auto"`` may pick this adapter on ``device``."""
        return cls.available(device) and (cls.preferred_on is None or device.type in cls.preferred_on)

    def unsupported(self, *, causal: bool, grad: bool) -> str | None:
        """Why this adapter cannot compute this case on its device, or None if it can."""
        return None

    @property
    def backend(self) -> str:
        """The kernel that actually runs, for benchmark records."""
        return self.name

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        reason = self.unsupported(causal=causal, grad=torch.is_grad_enabled() and q.requires_grad)
        if reason is not None:
            raise ValueError(f"attention adapter {self.name!r} on {q.device.type}: {reason}")
        return self.attend(q, k, v, batch, causal=causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        raise NotImplementedError


class NaiveAttention(AttentionAdapter):
    """The ground truth: explicit fp32 softmax(q kᵀ / sqrt(D)) v, one sequence at a time.

    Slow and obviously correct, for any layout. It reads only real positions, so padding slots
    (even NaN ones) cannot reach the output; their output is 0.
    """

    name = "naive"
    layouts = frozenset(LAYOUTS)

    @property
    def backend(self) -> str:
        return "naive-fp32"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        scale = q.shape[-1] ** -0.5
        if batch.layout == "padded":
            spans = [(b, slice(0, n)) for b, n in enumerate(batch.seq_lens)]
        else:
            starts = list(accumulate(batch.seq_lens, initial=0))  # host ints, no device read
            spans = [(slice(s, e),) for s, e in zip(starts[:-1], starts[1:])]
        for idx in spans:
            qs, ks, vs = (t[idx].float().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
            scores = qs @ ks.transpose(-1, -2) * scale  # (H, n, n)
            if causal:
                n = scores.shape[-1]
                future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            out[idx] = (scores.softmax(-1) @ vs).transpose(0, 1)  # (n, H, D)
        return out.to(q.dtype)


class SdpaAttention(AttentionAdapter):
    """``F.scaled_dot_product_attention`` on the padded layout.

    Causal uses ``is_causal=True``: rows are right-padded, so a real query only ever sees earlier
    real keys. Bidirectional masks padding keys with the batch's ``attention_mask``.

    Masked keys get weight 0 but are still multiplied, so a NaN in a padding slot reaches the
    output (0 x NaN; checked on torch 2.13 CPU). Padding slots hold the embedded pad id, which is
    finite; what the pad id *is* does not change real outputs (tested).
    """

    name = "sdpa"
    layouts = frozenset({"padded"})
    reads_padding = True

    @property
    def backend(self) -> str:
        return "torch.sdpa"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        mask = None if causal else batch.attention_mask[:, None, None, :]  # (B, 1, 1, L) over keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
        )  # (B, H, L, D)
        return out.transpose(1, 2)  # (B, L, H, D)


def _pad_rows(out: Tensor, total: int) -> Tensor:
    """(N, H, D) -> (total, H, D) with zero rows for the packed padding tail.

    Varlen kernels leave rows past ``cu_seqlens[-1]`` unwritten; garbage there would flow into the
    next layer and, as 0 x NaN, into the gradients. The kernel's output cannot be zeroed in place
    because its backward saves it, so the tail is appended instead (only when the row is padded).
    """
    return out if out.shape[0] == total else F.pad(out, (0, 0, 0, 0, 0, total - out.shape[0]))


class FlashVarlenAttention(AttentionAdapter):
    """Varlen flash attention on the packed layout: q, k, v (T, H, D) with the batch's
    ``cu_seqlens`` and host-side ``max_seqlen``, so nothing is read back from the device.

    A batch with ``static_cu_seqlens`` (``ConcatCuSeqlens(total_tokens=, max_seqs=, max_seqlen=)``)
    runs over the whole padded row with those fixed-length boundaries and ``static_max_seqlen``:
    the padding tail attends only within its own blocks, and the trailing empty sequences are
    skipped by the kernel.

    Backends, first that loads wins (``backend`` says which ran):

    1. ``flash-attn-4``: FlashAttention-4's varlen kernel as a torch custom op
       (:mod:`models.flash4`), on Hopper (sm90) or newer;
    2. ``flash-attn-2``: ``flash_attn.flash_attn_varlen_func`` (detected by that attribute, since
       FlashAttention-4 installs a ``flash_attn`` namespace package without it);
    3. ``torch.varlen_attn``: ``torch.nn.attention.varlen.varlen_attn``, the FA2 kernel in torch
       >= 2.10 (causal is ``window_size=(-1, 0)`` from 2.11, ``is_causal=True`` in 2.10).

    The kernels take bf16 or fp16 only: run the model under ``torch.autocast``.
    """

    name = "flash"
    layouts = frozenset({"packed"})
    devices = frozenset({"cuda"})
    needs = "CUDA and a varlen kernel: flash-attn-4 (Hopper+), flash-attn 2, or torch >= 2.10's varlen_attn"

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return device.type == "cuda" and flash_backend() is not None

    # What the flash kernels take; a ``kernel`` given to __init__ may take more.
    kernel_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16)

    def __init__(
        self,
        device: torch.device | str,
        kernel: tuple[str, Callable[..., Tensor]] | None = None,
        kernel_dtypes: tuple[torch.dtype, ...] | None = None,
    ) -> None:
        """``kernel``: (name, fn(q, k, v, cu_seqlens, max_seqlen, causal) -> out) to run instead of
        :func:`flash_backend`'s, with the dtypes it takes; tests pass an fp32 reference here to check
        this adapter's own logic on a CPU."""
        super().__init__(device)
        # Resolved once: a cached lookup called inside every layer breaks torch.compile's graph.
        self._backend, self._run = kernel if kernel is not None else flash_backend()
        if kernel_dtypes is not None:
            self.kernel_dtypes = kernel_dtypes

    @property
    def backend(self) -> str:
        return self._backend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        if q.dtype not in self.kernel_dtypes:
            raise ValueError(
                f"attention adapter 'flash' needs bf16 or fp16 q/k/v, got {q.dtype}; "
                "run the model under torch.autocast('cuda', dtype=torch.bfloat16) or use attn='naive'"
            )
        if batch.static_cu_seqlens is not None:
            # Static shapes: the whole row, with boundaries of a fixed length and a constant
            # max_seqlen, so a compiled step sees identical shapes and constants every batch.
            return self._run(q, k, v, batch.static_cu_seqlens, batch.static_max_seqlen, causal)
        n = batch.num_tokens
        out = self._run(q[:n], k[:n], v[:n], batch.cu_seqlens, batch.max_seqlen, causal)
        return _pad_rows(out, q.shape[0])


@functools.cache
def flash_backend() -> tuple[str, Callable[..., Tensor]] | None:
    """(name, fn(q, k, v, cu_seqlens, max_seqlen, causal) -> out) for the best varlen kernel, or None.

    q is (T, H, D); k and v may have fewer heads, (T, H_kv, D) with H a multiple of H_kv: every
    backend runs grouped-query attention in the kernel, without repeating k and v.
    """
    from models.flash4 import fa4_available, fa4_varlen

    if fa4_available():
        # A custom op (models.flash4): traced as Python, FA4's launcher broke the graph and
        # recompiled on every layer; behind torch.compiler.disable it broke the graph in all 24
        # layers and recompiled 15 times in 23 steps (H200).
        return "flash-attn-4", fa4_varlen
    try:
        import flash_attn

        fa2 = flash_attn.flash_attn_varlen_func
    except (ImportError, AttributeError):
        pass
    else:

        def run_fa2(q, k, v, cu, max_len, causal):
            return fa2(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                       max_seqlen_k=max_len, causal=causal)

        return "flash-attn-2", run_fa2
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # Where varlen_attn has enable_gqa it refuses fewer key/value heads without it; where it has
    # not, it hands them to the FA2 kernel, which takes them as they are.
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
    if "window_size" in params:  # torch >= 2.11

        def run_torch(q, k, v, cu, max_len, causal):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1), **gqa)

    else:  # torch 2.10

        def run_torch(q, k, v, cu, max_len, causal):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal, **gqa)

    return "torch.varlen_attn", run_torch


class XformersAttention(AttentionAdapter):
    """xFormers ``memory_efficient_attention`` over the packed row with a ``BlockDiagonalMask``,
    made causal with ``make_causal()``.

    The mask comes from the ``xformers`` collator, built on the host. For a ``concat`` batch
    (no mask) it is built here from the host-side ``seq_lens``, still without a device sync.
    Kernels: xFormers itself where its ops load (its 0.0.35 wheels need torch 2.10), else
    ``mslk`` (``mslk-cuda``, the same kernels packaged for torch 2.11); ``backend`` says which.
    """

    name = "xformers"
    layouts = frozenset({"packed"})
    devices = frozenset({"cuda"})
    needs = "CUDA and xFormers kernels that load: xformers (its wheels need torch 2.10) or mslk-cuda (torch 2.11)"

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return device.type == "cuda" and fmha_backend() is not None

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(device)
        self._backend, self._fmha = fmha_backend()  # resolved once, as for flash

    @property
    def backend(self) -> str:
        return self._backend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        fmha = self._fmha
        mask_cls = fmha.attn_bias.BlockDiagonalMask
        bias = batch.attn_bias
        if type(bias) is not mask_cls:  # absent (concat batch), or made by the other package
            lens = list(batch.seq_lens) + ([batch.num_slots - batch.num_tokens] if batch.num_slots > batch.num_tokens else [])
            bias = mask_cls.from_seqlens(lens, device=q.device)
        if causal:
            bias = bias.make_causal()
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]  # (T, H, D)


@functools.cache
def fmha_backend() -> tuple[str, ModuleType] | None:
    """("xformers" or "mslk", its fmha module) for the first whose CUDA kernels run, or None."""
    if not torch.cuda.is_available():
        return None
    for name, module in (("xformers", "xformers.ops.fmha"), ("mslk", "mslk.attention.fmha")):
        try:
            fmha = importlib.import_module(module)
            x = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
            fmha.memory_efficient_attention(x, x, x)  # xFormers imports fine but fails here on torch 2.11
        except Exception:  # noqa: BLE001 - any failure means "this package's kernels do not run here"
            continue
        return name, fmha
    return None


class SdpaNestedAttention(AttentionAdapter):
    """SDPA on jagged NestedTensors: (B, H, j, D) views over the values, no padding anywhere.

    The views reuse the batch's offsets and host-side min/max seqlen, so SDPA never reads the
    lengths back from the device. On CPU, torch has only a bidirectional kernel for NestedTensors,
    so causal there raises a ``ValueError`` (``auto`` picks the naive reference on CPU instead).
    """

    name = "sdpa_nested"
    layouts = frozenset({"nested"})
    preferred_on = frozenset({"cuda"})

    @property
    def backend(self) -> str:
        return "torch.sdpa-nested"

    def unsupported(self, *, causal: bool, grad: bool) -> str | None:
        if causal and self.device.type == "cpu":
            return (
                "torch has no causal SDPA kernel for NestedTensors on CPU (bidirectional only); "
                "use attn='naive' for causal on CPU, or run on CUDA"
            )
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        offsets = batch.input_ids.offsets()
        lo, hi = min(batch.seq_lens), batch.max_seqlen

        def nested(t: Tensor) -> Tensor:
            # NestedTensor SDPA needs contiguous values; q/k/v are strided views of the fused qkv.
            t = torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets, min_seqlen=lo, max_seqlen=hi)
            return t.transpose(1, 2)  # (B, H, j, D)

        out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), is_causal=causal)
        return out.transpose(1, 2).values()  # (N, H, D)


class FlexDocumentAttention(AttentionAdapter):
    """FlexAttention over the packed row with a document (plus causal) ``BlockMask``.

    The mask is built once per batch on the host from ``seq_lens`` (see :mod:`models.block_mask`:
    no T x T tensor) and shared by every layer. On CUDA, ``flex_attention`` runs compiled; pad the
    row to a fixed ``total_tokens`` or a multiple to keep shapes static. On CPU it runs torch's
    unfused eager reference (``backend`` "flex-eager"), forward only: torch has no CPU backward.

    Measured on an H100 (seed model, 32 documents a step): 1.37x pad_max in training against 1.66x
    for ``flash``. The gap is the flex kernels themselves (17.0 + 23.3 ms a step against 6.1 + 12.5
    ms for FA2), mostly in partial tiles where the mask is evaluated per element; the mask build
    (2.4 ms on the host, once per batch) is not (benchmarks/results/2026-11-22-h100-kernels).
    """

    name = "flex"
    layouts = frozenset({"packed"})
    preferred_on = frozenset({"cuda"})
    reads_padding = True  # the tail shares partial blocks with real tokens; the mask gives it weight 0

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(device)
        self._mask_for: tuple[Batch, bool] | None = None
        self._mask = None
        self._flex = torch.compile(flex_attention) if self.device.type == "cuda" else flex_attention

    @property
    def backend(self) -> str:
        return "flex-compiled" if self.device.type == "cuda" else "flex-eager"

    def unsupported(self, *, causal: bool, grad: bool) -> str | None:
        if grad and self.device.type == "cpu":
            return "torch's FlexAttention has no backward on CPU; train with attn='naive' on CPU, or run on CUDA"
        return None

    def block_mask(self, batch: Batch, causal: bool):
        """The batch's BlockMask, built on its first layer and reused by the rest."""
        if self._mask_for is None or self._mask_for[0] is not batch or self._mask_for[1] != causal:
            self._mask = document_block_mask(batch.seq_lens, batch.num_slots, causal=causal, device=self.device)
            self._mask_for = (batch, causal)
        return self._mask

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        mask = self.block_mask(batch, causal)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
        if self.device.type == "cpu":
            with warnings.catch_warnings():
                # Eager flex warns that it is unfused; on CPU that is the documented reference path.
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                out = self._flex(q, k, v, block_mask=mask)
        else:
            out = self._flex(q, k, v, block_mask=mask)
        return out[0].transpose(0, 1)  # (T, H, D)


# Preference order for "auto": fastest first; the naive reference takes any layout, so it is last.
ADAPTERS: dict[str, type[AttentionAdapter]] = {
    cls.name: cls
    for cls in (
        FlashVarlenAttention,
        XformersAttention,
        SdpaNestedAttention,
        SdpaAttention,
        FlexDocumentAttention,
        NaiveAttention,
    )
}


def adapters_for(layout: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the adapters that take ``layout`` (and run on ``device``, if given), fastest first."""
    dev = None if device is None else torch.device(device)
    return [n for n, c in ADAPTERS.items() if layout in c.layouts and (dev is None or c.available(dev))]


def auto_adapter(layout: str, device: torch.device | str) -> str:
    """The adapter ``"auto"`` picks: the first preferred one that takes ``layout`` on ``device``."""
    dev = torch.device(device)
    return next(n for n, c in ADAPTERS.items() if layout in c.layouts and c.preferred(dev))


def get_adapter(name: str, layout: str, device: torch.device | str) -> AttentionAdapter:
    """Build the adapter ``name`` for ``layout`` on ``device``; ``"auto"`` picks the fastest available.

    Raises ``ValueError`` for an unknown name, a layout the adapter cannot take, or a device it
    cannot run on, listing the adapters that can.
    """
    device = torch.device(device)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if name == "auto":
        return ADAPTERS[auto_adapter(layout, device)](device)
    if name not in ADAPTERS:
        raise ValueError(f"unknown attention adapter {name!r}; known: auto, {', '.join(ADAPTERS)}")
    cls = ADAPTERS[name]
    if layout not in cls.layouts:
        raise ValueError(
            f"attention adapter {name!r} takes layouts {sorted(cls.layouts)}, not {layout!r}; "
            f"adapters that take {layout!r}: {', '.join(adapters_for(layout))}"
        )
    if not cls.available(device):
        raise ValueError(
            f"attention adapter {name!r} is not available on {device}: it needs {cls.needs}; "
            f"adapters for {layout!r} there: {', '.join(adapters_for(layout, device))}"
        )
    return cls(device)
