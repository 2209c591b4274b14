"""What the benchmark entry points share: device resolution (and, re-exported, the one-line parser)."""

from __future__ import annotations

import torch

from packing.cli import Parser

__all__ = ["Parser", "resolve_device"]


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
