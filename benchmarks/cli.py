"""What the command-line entry points share: one-line errors and device resolution."""

from __future__ import annotations

import argparse
from typing import NoReturn

import torch


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


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
