"""What every kernel module shares: the GPU check, the flash window convention, the head-dimension
floors, and the version ranges of the packages whose private APIs we call.

Private APIs change without notice, so each package we reach into has a range of versions it was
verified with (:data:`VERIFIED`). :func:`check_version` runs once when a kernel loads: outside the
range it raises an ``ImportError`` naming the package, its version, the range and the pin, and the
kernel is reported as not loading (never run against an API it was not written for).

Examples:
    >>> flash_window(4096, causal=True), flash_window(None, causal=True)
    ((4095, 0), (-1, 0))
"""

from __future__ import annotations

import functools
import importlib
import re
from importlib import metadata

import torch

# The smallest head dimension whose gradients a kernel computes right. FA4 4.0.0b36 gives the right
# forward at head dimension 16 but dq, dk and dv far off fp32 (32, 64 and 128 within 0.5%; python -m
# benchmarks.kernel_head_dims measures it). torch's kernel is right at 16.
VARLEN_MIN_HEAD_DIM = {"flash-attn-4": 32}
# Head dimensions torch's kernel (FA2 through aten._flash_attention_forward) refuses at run time,
# from inside the kernel: "head_size must be a multiple of 8", and at most 256.
VARLEN_HEAD_DIM_MULTIPLE = {"torch.varlen_attn": 8}
VARLEN_MAX_HEAD_DIM = {"torch.varlen_attn": 256}

# distribution -> (lowest, below): the versions whose private APIs the wrappers were written against
# and run with (pyproject's extras pin the same ranges). FA3 publishes no distribution version we
# can read from a source build, so it is checked by the signature of the function we call instead.
VERIFIED = {
    "flash-attn-4": ("4.0.0b30", "4.1"),  # flash_attn.cute.interface._flash_attn_fwd/_bwd (ran 4.0.0b36)
}


def version_key(version: str) -> tuple:
    """A sortable key for versions like 4.0.0b36, 0.6.5 or 4.1 (a pre-release before its release).

    Examples:
        >>> version_key("4.0.0b36") < version_key("4.0.0") < version_key("4.1")
        True
    """
    m = re.match(r"(\d+(?:\.\d+)*)(?:\.?(a|b|rc)(\d+))?", version)
    if m is None:
        raise ImportError(f"cannot read the version {version!r}")
    release = tuple(int(x) for x in m[1].split("."))
    release += (0,) * (4 - len(release))
    stage = {"a": 0, "b": 1, "rc": 2, None: 3}[m[2]]
    return release, stage, int(m[3] or 0)


@functools.cache
def check_version(distribution: str, verified: tuple[str, str] | None = None) -> str:
    """The installed version of ``distribution``, or ImportError when it is outside ``verified``
    (lowest, below), by default its range in :data:`VERIFIED`."""
    low, below = verified or VERIFIED[distribution]
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise ImportError(f"{distribution} is not installed") from None
    if not version_key(low) <= version_key(version) < version_key(below):
        raise ImportError(
            f"{distribution} {version} is outside the versions this project's wrapper of its private API was "
            f"verified with (>= {low}, < {below}); install one: pip install '{distribution}>={low},<{below}'"
        )
    return version


def gpu_loads(module: str, *, min_major: int = 9, max_major: int | None = None) -> bool:
    """Whether a CUDA GPU of compute capability major ``min_major`` (9: Hopper) up to ``max_major``
    is here and ``module`` imports: the check every Hopper-only kernel package needs."""
    if not torch.cuda.is_available():
        return False
    major = torch.cuda.get_device_capability()[0]
    if major < min_major or (max_major is not None and major > max_major):
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def flash_window(window: int | None, causal: bool) -> tuple[int, int]:
    """A flash kernel's ``window_size=(left, right)`` for transformers' ``sliding_window`` (keys
    counting the query itself; None for none): (window - 1, 0) causal, -1 meaning unbounded."""
    left = -1 if window is None else window - 1
    return (left, 0) if causal else (left, left)
