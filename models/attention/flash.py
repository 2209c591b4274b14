"""``flash``: varlen flash attention on the packed layout (kernels: :mod:`packing.kernels`)."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.base import AttentionAdapter
from models.kernels import flash_backend, packed_kernel
from packing.kernels import varlen_kernels
from packing.kernels.choice import Kernel, KernelSet
from packing.batch import Batch


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

    0. ``flash-attn-3``: FlashAttention-3's varlen kernel (:mod:`packing.kernels.flash3`), on
       Hopper (sm90) only, where it is the production kernel;
    1. ``flash-attn-4``: FlashAttention-4's varlen kernel as a torch custom op
       (:mod:`packing.kernels.flash4`), on Hopper (sm90) or newer;
    2. ``flash-attn-2``: ``flash_attn.flash_attn_varlen_func`` (detected by that attribute, since
       FlashAttention-4 installs a ``flash_attn`` namespace package without it);
    3. ``torch.varlen_attn``: ``torch.nn.attention.varlen.varlen_attn``, the FA2 kernel in torch
       >= 2.10 (causal is ``window_size=(-1, 0)`` from 2.11, ``is_causal=True`` in 2.10).

    The kernels take bf16 or fp16 only: run the model under ``torch.autocast``.

    :meth:`attend_packed` (the model's ``qkv`` fusion) runs FA3's or FA4's packed form, whose
    backward writes one (T, 3, H, D) gradient; with the other kernels it unbinds q, k, v.

    The first kernel that computes the head dimension runs: an FA3 build without head dimension 64
    passes a head-dimension-64 model to the next kernel. ``GPT.adapter`` calls
    :meth:`bind_head_dim`, so ``backend`` names the kernel the model's layers run.
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
        packed: Callable[..., Tensor] | None = None,
    ) -> None:
        """``kernel``: (name, fn(q, k, v, cu_seqlens, max_seqlen, causal) -> out) to run instead of
        the kernels that load (:func:`packing.kernels.varlen_kernels`), with the dtypes it takes,
        and ``packed`` its packed form fn(qkv, cu_seqlens, max_seqlen, causal) -> out, if any; tests pass fp32 references here to
        check this adapter's own logic on a CPU."""
        super().__init__(device)
        # Resolved once: a cached lookup called inside every layer breaks torch.compile's graph.
        # The kernel a head dimension runs is chosen as transformers' packing_varlen chooses it
        # (packing.kernels.choice); each kernel's packed form, if any, rides beside it.
        if kernel is not None:
            self._kernels = KernelSet([Kernel(kernel[0], kernel[1], frozenset(), lambda head_dim: True)])
            self._packed = {kernel[0]: packed}
        else:
            self._kernels = KernelSet.of(varlen_kernels())
            if not self._kernels.kernels:
                raise ValueError(f"attention adapter 'flash' needs {self.needs}; none loads here")
            self._packed = {name: packed_kernel(name) for name in self._kernels.names}
        self._head_dim: int | None = None
        if kernel_dtypes is not None:
            self.kernel_dtypes = kernel_dtypes

    @property
    def backend(self) -> str:
        """The kernel the bound head dimension runs (:meth:`bind_head_dim`), else the first that loads."""
        return self._kernels.names[0] if self._head_dim is None else self._kernel_for(self._head_dim).name

    def bind_head_dim(self, head_dim: int) -> None:
        """Check now, outside any compiled step, that a kernel here computes ``head_dim``, and name
        it in ``backend``; a ValueError listing the kernels if none does."""
        self._kernel_for(head_dim)
        self._head_dim = head_dim

    def _kernel_for(self, head_dim: int) -> Kernel:
        # A pure lookup over plain tuples: safe while torch.compile traces a layer.
        return self._kernels.require({}, head_dim, who="attention adapter 'flash'",
                                     fix="torch's kernel takes multiples of 8 up to 256, an FA3 build only the head "
                                         "dimensions it was built with: change n_heads or dim, or use attn='sdpa'")

    def _check_dtype(self, q: Tensor) -> None:
        if q.dtype not in self.kernel_dtypes:
            raise ValueError(
                f"attention adapter 'flash' needs bf16 or fp16 q/k/v, got {q.dtype}; "
                "run the model under torch.autocast('cuda', dtype=torch.bfloat16) or use attn='naive'"
            )

    def attend_packed(self, qkv: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        packed = self._packed[self._kernel_for(qkv.shape[-1]).name]
        if packed is None:
            return super().attend_packed(qkv, batch, causal=causal)
        self._check_dtype(qkv)
        cu_seqlens, max_seqlen, n = _boundaries(batch, qkv.shape[0])
        return _pad_rows(packed(_first_rows(qkv, n), cu_seqlens, max_seqlen, causal), qkv.shape[0])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: Batch, *, causal: bool) -> Tensor:
        self._check_dtype(q)
        run = self._kernel_for(q.shape[-1]).run
        cu_seqlens, max_seqlen, n = _boundaries(batch, q.shape[0])
        out = run(_first_rows(q, n), _first_rows(k, n), _first_rows(v, n), cu_seqlens, max_seqlen, causal)
        return _pad_rows(out, q.shape[0])


def _boundaries(batch: Batch, rows: int) -> tuple[Tensor, int, int]:
    """(cu_seqlens, max_seqlen, n): the kernel runs on the first n of ``rows`` token rows.

    Static shapes: the whole row, with boundaries of a fixed length and a constant max_seqlen, so a
    compiled step sees identical shapes and constants every batch. Otherwise the real tokens.
    """
    if batch.static_cu_seqlens is not None:
        return batch.static_cu_seqlens, batch.static_max_seqlen, rows
    return batch.cu_seqlens, batch.max_seqlen, batch.num_tokens


def _first_rows(x: Tensor, n: int) -> Tensor:
    """x[:n], sliced only when rows are cut: the slice's backward pads the gradient with zero rows,
    a copy of the whole gradient."""
    return x if n == x.shape[0] else x[:n]
