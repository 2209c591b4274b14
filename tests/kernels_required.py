"""``REQUIRE_KERNELS=fa3,fa4,quack,mslk`` (or ``pytest --require-kernels fa3,fa4``): a GPU test that
would skip because one of these kernels does not load fails instead, so a version mismatch on a
device run reads as a failure, not a pass. Device runs set it."""

from __future__ import annotations

import os

import pytest

KNOWN = ("fa3", "fa4", "fa2", "quack", "mslk", "xformers")


def required() -> set[str]:
    names = {n.strip() for n in os.environ.get("REQUIRE_KERNELS", "").split(",") if n.strip()}
    unknown = names - set(KNOWN)
    if unknown:
        raise pytest.UsageError(f"REQUIRE_KERNELS names {sorted(unknown)}; known kernels: {', '.join(KNOWN)}")
    return names


def skip_unless(kernel: str, loads: bool, why: str) -> None:
    """Skip the test when ``kernel`` does not load, or fail when REQUIRE_KERNELS names it."""
    if loads:
        return
    if kernel in required():
        pytest.fail(f"REQUIRE_KERNELS has {kernel}, but it does not load: {why}")
    pytest.skip(why)
