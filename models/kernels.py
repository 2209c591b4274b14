"""The optional kernels only the toy GPT uses, beside the varlen kernels of :mod:`packing.kernels`:
xFormers' (or mslk's) memory-efficient attention, the packed-qkv forms of FA3 and FA4
(:mod:`models.packed_qkv`), and what a benchmark record lists as loaded. Resolved once per process.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from models.packed_qkv import packed_kernel  # noqa: F401  (the toy GPT's one import for kernels)
from packing.kernels import varlen_kernels

__all__ = ["flash_backend", "fmha_backend", "loaded", "packed_kernel"]


@functools.cache
def flash_backend() -> tuple[str, Callable[..., Tensor]] | None:
    """(name, fn) for the best varlen kernel (the first of :func:`packing.kernels.varlen_kernels`), or None."""
    return next(iter(varlen_kernels().items()), None)


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


def loaded() -> dict[str, str]:
    """Each optional kernel package that loads and runs here, with its version where it has one:
    what a benchmark record says ran beside each row's ``backend``. Keys among ``flash-attn-3``,
    ``flash-attn-4``, ``flash-attn-2``, ``torch.varlen_attn``, ``xformers``, ``mslk``, ``quack``."""
    from importlib import metadata

    from models.fusion import QUACK_VERIFIED
    from packing.kernels.common import check_version, gpu_loads

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "source build"

    dists = {"flash-attn-4": "flash-attn-4", "flash-attn-2": "flash-attn", "flash-attn-3": "flash-attn-3",
             "xformers": "xformers", "mslk": "mslk-cuda"}
    found = {name: (torch.__version__ if name == "torch.varlen_attn" else version(dists[name]))
             for name in varlen_kernels()}
    fmha = fmha_backend()
    if fmha is not None:
        found[fmha[0]] = version(dists[fmha[0]])
    if gpu_loads("quack.rmsnorm"):
        try:
            found["quack"] = check_version("quack-kernels", QUACK_VERIFIED)
        except ImportError as e:
            found["quack"] = f"not used: {e}"
    return found
