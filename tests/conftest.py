# Subprocess entry points the tests launch (torchrun, SIGKILL); they are not test modules, and
# --doctest-modules must not import them in the test process.
collect_ignore_glob = ["*_worker.py", "kernels_required.py", "property.py"]


def pytest_addoption(parser):
    parser.addoption("--require-kernels", default="", metavar="NAMES",
                     help="fail, not skip, GPU tests whose kernels (fa3,fa4,fa2,quack,mslk,xformers) do not load; "
                          "the same as REQUIRE_KERNELS=NAMES")


def pytest_configure(config):
    import os

    names = config.getoption("--require-kernels")
    if names:
        os.environ["REQUIRE_KERNELS"] = ",".join(filter(None, [os.environ.get("REQUIRE_KERNELS", ""), names]))


# -- optional packages ------------------------------------------------------------------------------
# `pip install -e .` without extras, then the test command: a test that needs an optional package
# which is not installed is skipped, naming it; nothing else is. The check is on the package really
# being absent, so an ImportError from installed code still fails.
import importlib.util  # noqa: E402

import pytest  # noqa: E402

OPTIONAL = {  # package -> the extra that installs it
    "xformers": "xformers (or mslk-cuda)", "mslk": "xformers (or mslk-cuda)", "tokenizers": "hf", "transformers": "hf",
    "accelerate": "dev", "matplotlib": "report", "torchdata": "stream", "hypothesis": "dev",
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
                               f"Skipped: needs the optional package {package} (pip install -e '.[{OPTIONAL[package]}]')")
