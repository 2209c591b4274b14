"""hypothesis for the property tests, or, where it is not installed (``pip install -e .`` without
the dev extra), stand-ins that skip each property test by name and leave every other test running.

Import from here: ``from property import HealthCheck, given, settings, st``.
"""

from __future__ import annotations

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    import pytest

    class _Placeholder:
        """Any strategy or health check: never drawn from, since the test is skipped."""

        def __getattr__(self, name: str):
            return lambda *args, **kwargs: self

    st = HealthCheck = _Placeholder()

    def given(*args, **kwargs):
        return pytest.mark.skip(reason="a hypothesis property test: pip install hypothesis (the dev extra)")

    def settings(*args, **kwargs):
        return lambda test: test

__all__ = ["HealthCheck", "given", "settings", "st"]
