"""Test-session hooks for the whole repository: the tests under tests/ and the docstring examples
in packing/, models/ and benchmarks/ (collected with --doctest-modules)."""

# -- optional packages ------------------------------------------------------------------------------
# `pip install -e .` without extras, then the test command: a test that needs an optional package
# which is not installed is skipped, naming it; nothing else is. The check is on the package really
# being absent, so an ImportError from installed code still fails.
import importlib.util

import pytest

OPTIONAL = {  # package -> how to install it
    "xformers": "pip install -e '.[xformers]' (or mslk-cuda on torch 2.11)",
    "mslk": "pip install -e '.[xformers]' (or mslk-cuda on torch 2.11)",
    "tokenizers": "pip install -e '.[hf]'", "transformers": "pip install -e '.[hf]'", "accelerate": "pip install -e '.[dev]'",
    "matplotlib": "pip install -e '.[report]'", "torchdata": "pip install -e '.[stream]'", "hypothesis": "pip install -e '.[dev]'",
    "datasets": "pip install -e '.[dev]'", "pyarrow": "pip install -e '.[dev]'", "trl": "pip install -e '.[dev]'",
}


def _missing_optional(error: BaseException) -> str | None:
    """The optional package whose absence raised ``error``, or None."""
    text = f"{getattr(error, 'name', '') or ''} {error}"
    for package in OPTIONAL:
        if package in text and importlib.util.find_spec(package) is None:
            if package in ("xformers", "mslk") and any(importlib.util.find_spec(p) for p in ("xformers", "mslk")):
                continue  # one of the two is enough for the mask
            return package
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.when != "call":
        return
    error = call.excinfo.value
    if getattr(error, "failures", None):  # pytest's doctest runner collects its failures
        error = error.failures[0]
    error = getattr(error, "exc_info", (None, error))[1]  # a doctest's UnexpectedException wraps it
    if isinstance(error, ImportError):
        package = _missing_optional(error)
        if package:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"Skipped: needs the optional package {package} ({OPTIONAL[package]})")
