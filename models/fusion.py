"""Which fused kernels the model may use: the ``fuse`` argument of :class:`models.gpt.GPT`.

Three fusions, each a drop-in for the same math (exact GELU, LayerNorm with its bias, the same
residual stream), each from a maintained package, and each falling back to plain torch where its
kernel cannot take the tensors:

- ``mlp``: the MLP's exact (erf) GELU in the epilogue of the first GEMM, and its derivative in the
  epilogue of the backward GEMM (quack's ``gemm_act`` / ``gemm_dact`` with ``gelu_erf``), so the
  (T, 4 dim) activation is not read back for the GELU (:mod:`models.mlp`).
- ``norm``: the residual add and the LayerNorm after it as one kernel forward and one backward
  (quack's LayerNorm with a residual), instead of Inductor's or eager's (:mod:`models.norm`).
- ``qkv``: the attention kernel writes dq, dk and dv straight into one (T, 3, H, D) gradient, so
  the backward of ``qkv.unbind`` does not copy them into it (flash-attn-3 or -4 on the ``flash``
  adapter; :meth:`~models.attention.base.AttentionAdapter.attend_packed`).

quack-kernels is the optional extra ``hopper`` (``pip install -e ".[hopper]"``); its GEMMs and norms
run on Hopper (sm90) or newer GPUs, in bf16 or fp16 (under ``torch.autocast``). Elsewhere (a CPU,
fp32 compute, nested tensors) the model runs the torch path, with the same parameters.

Example:
    >>> resolve_fuse("none")
    frozenset()
    >>> resolve_fuse("qkv")
    frozenset({'qkv'})
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

FUSIONS = ("mlp", "norm", "qkv")
QUACK_FUSIONS = frozenset({"mlp", "norm"})
INSTALL = "pip install -e \".[hopper]\" (quack-kernels, a Hopper or newer GPU)"
# The quack-kernels versions whose private API models.norm and models.mlp were written against and
# ran with (quack.rmsnorm._rmsnorm_fwd/_bwd, quack.gemm_interface; ran 0.6.5); pyproject's hopper
# extra pins the same range.
QUACK_VERIFIED = ("0.6.5", "0.6.6")


@functools.cache
def quack_available() -> bool:
    """Whether quack-kernels imports, is a version whose private API models.norm and models.mlp were
    written against (:data:`QUACK_VERIFIED`; each private function is called in one place), and the
    GPU is Hopper (sm90) or newer."""
    from packing.kernels.common import check_version, gpu_loads

    if not (gpu_loads("quack.linear") and gpu_loads("quack.rmsnorm")):
        return False
    try:
        check_version("quack-kernels", QUACK_VERIFIED)
    except ImportError:
        return False
    return True


def available_fusions() -> frozenset[str]:
    """The fusions whose kernels load here (``qkv`` only matters to an adapter that takes it)."""
    return (QUACK_FUSIONS if quack_available() else frozenset()) | {"qkv"}


def resolve_fuse(fuse: str | frozenset[str] | set[str] | tuple[str, ...]) -> frozenset[str]:
    """``"auto"`` (every fusion whose kernels load here), ``"none"``, or names from :data:`FUSIONS`
    (a comma-separated string or a collection). A named fusion whose kernels do not load raises a
    ``ValueError`` with the install line."""
    if isinstance(fuse, str):
        if fuse == "auto":
            return available_fusions()
        names = frozenset() if fuse == "none" else frozenset(n.strip() for n in fuse.split(",") if n.strip())
    elif isinstance(fuse, (set, frozenset, tuple, list)):
        names = frozenset(fuse)
    else:
        raise TypeError(f"fuse must be 'auto', 'none' or names from {FUSIONS}, got {type(fuse).__name__}")
    unknown = sorted(n for n in names if n not in FUSIONS)
    if unknown:
        raise ValueError(f"unknown fusion {unknown[0]!r}; choose from {', '.join(FUSIONS)}, 'auto' or 'none'")
    if names & QUACK_FUSIONS and not quack_available():
        raise ValueError(
            f"fuse={','.join(sorted(names))} needs quack-kernels on a Hopper (sm90) or newer GPU, "
            f"which do not load here; {INSTALL}, or use fuse='none'"
        )
    return names


def half_compute_dtype(x: Tensor) -> torch.dtype | None:
    """The bf16/fp16 dtype a fused kernel would compute ``x`` in, or None where it cannot take it:
    CPU tensors, nested tensors, and fp32 compute (no autocast) keep the torch path."""
    if not x.is_cuda or x.is_nested:
        return None
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = x.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
