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
# The nvidia-cutlass-dsl releases from which quack's GEMM epilogues (the ``mlp`` fusion) were seen
# not to build: quack 0.6.5 checks what each epilogue function depends on, and finds DSL state it
# cannot key (on an H100: "epilogue fn depends on <Logger CUTE_DSL ...>" with 4.7.1, "<ContextVar
# name='_LOC_TRANSFORMS' ...>" with 4.8.1). quack 0.6.5 needs the DSL >= 4.7; 4.7.0 was not tried (the
# fused runs that worked did not record their DSL release).
# Its LayerNorm (the ``norm`` fusion) ran with 4.7.1.
QUACK_GEMM_BAD_CUTLASS = "4.7.1"


def quack_available(fusion: str = "norm") -> bool:
    """Whether quack's kernels for ``fusion`` (``"mlp"`` or ``"norm"``) run here: quack-kernels
    imports, is a version whose private API models.norm and models.mlp were written against
    (:data:`QUACK_VERIFIED`; each private function is called in one place), the GPU is Hopper (sm90)
    or newer, and, for ``mlp``, its GEMM epilogues build with the installed nvidia-cutlass-dsl."""
    return quack_problem(fusion) is None


@functools.cache
def quack_problem(fusion: str = "norm") -> str | None:
    """Why quack's kernels for ``fusion`` do not run here (the version, the GPU, the DSL), or None."""
    from importlib import metadata

    from packing.kernels.common import check_version, gpu_loads, version_key

    if fusion not in QUACK_FUSIONS:
        raise ValueError(f"quack runs the fusions {sorted(QUACK_FUSIONS)}, not {fusion!r}")
    if not (gpu_loads("quack.linear") and gpu_loads("quack.rmsnorm")):
        return "quack-kernels does not import here, or there is no Hopper (sm90) or newer GPU"
    try:
        quack = check_version("quack-kernels", QUACK_VERIFIED)
    except ImportError as e:
        return str(e)
    if fusion == "norm":
        return None
    try:
        cutlass = metadata.version("nvidia-cutlass-dsl")
    except metadata.PackageNotFoundError:
        return None  # a source build of the DSL: nothing known against it
    if version_key(cutlass) >= version_key(QUACK_GEMM_BAD_CUTLASS):
        return (f"quack-kernels {quack} does not build its GEMM epilogues with nvidia-cutlass-dsl {cutlass} "
                f"('epilogue fn depends on ... which has no fail-closed semantic key'; seen with 4.7.1 and 4.8.1, "
                f"4.7.0 not tried)")
    return None


def available_fusions() -> frozenset[str]:
    """The fusions whose kernels load here (``qkv`` only matters to an adapter that takes it)."""
    return frozenset(name for name in QUACK_FUSIONS if quack_available(name)) | {"qkv"}


def resolve_fuse(fuse: str | frozenset[str] | set[str] | tuple[str, ...]) -> frozenset[str]:
    """``"auto"`` (every fusion whose kernels load here), ``"none"``, or names from :data:`FUSIONS`
    (a comma-separated string or a collection). A named fusion whose kernels do not load raises a
    ``ValueError`` with the reason and the fix."""
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
    for name in sorted(names & QUACK_FUSIONS):
        if not quack_available(name):
            fix = f"leave {name} out of fuse" if quack_available() else f"{INSTALL}, or leave {name} out of fuse"
            raise ValueError(f"fuse={','.join(sorted(names))}: the {name} fusion does not run here: "
                             f"{quack_problem(name)}; {fix}")
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
