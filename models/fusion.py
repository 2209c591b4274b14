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
# nvidia-cutlass-dsl releases quack's GEMM epilogue does not compile with: from 4.8 the DSL refuses
# an epilogue that reads a context variable ("epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'
# ...> which has no fail-closed semantic key", quack 0.6.5 with 4.8.1 on an H200). Refused here by
# name, not inside the first fused step.
QUACK_BAD_CUTLASS = "4.8"


def quack_available() -> bool:
    """Whether quack-kernels imports, is a version whose private API models.norm and models.mlp were
    written against (:data:`QUACK_VERIFIED`; each private function is called in one place), runs
    with the installed nvidia-cutlass-dsl, and the GPU is Hopper (sm90) or newer."""
    return quack_problem() is None


@functools.cache
def quack_problem() -> str | None:
    """Why quack's fused kernels do not run here (the version, the GPU, the DSL), or None."""
    from importlib import metadata

    from packing.kernels.common import check_version, gpu_loads, version_key

    if not (gpu_loads("quack.linear") and gpu_loads("quack.rmsnorm")):
        return "quack-kernels does not import here, or there is no Hopper (sm90) or newer GPU"
    try:
        quack = check_version("quack-kernels", QUACK_VERIFIED)
    except ImportError as e:
        return str(e)
    try:
        cutlass = metadata.version("nvidia-cutlass-dsl")
    except metadata.PackageNotFoundError:
        return None  # a source build of the DSL: nothing known against it
    if version_key(cutlass) >= version_key(QUACK_BAD_CUTLASS):
        return (f"quack-kernels {quack} does not compile its GEMM epilogues with nvidia-cutlass-dsl {cutlass} "
                f"(>= {QUACK_BAD_CUTLASS}: 'epilogue fn depends on <ContextVar ...> which has no fail-closed semantic "
                f"key'); pip install 'nvidia-cutlass-dsl>=4.7,<{QUACK_BAD_CUTLASS}'")
    return None


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
            f"which do not run here ({quack_problem()}); {INSTALL}, or use fuse='none'"
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
