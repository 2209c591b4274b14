# Subprocess entry points the tests launch (torchrun, SIGKILL); they are not test modules, and
# --doctest-modules must not import them in the test process.
collect_ignore_glob = ["*_worker.py", "kernels_required.py", "property.py"]


def pytest_addoption(parser):
    parser.addoption("--require-kernels", default="", metavar="NAMES",
                     help="fail, not skip, GPU tests whose kernels (fa3,fa4,fa2,quack,mslk,xformers) do not load; "
                          "the same as REQUIRE_KERNELS=NAMES")


def pytest_configure(config):
    import os
    import tempfile

    # Verdicts of packing.interop.verify go to a fresh folder: each run measures, none reads a
    # developer's cache, and nothing is left in ~/.cache.
    os.environ.setdefault("PACKING_CACHE_DIR", tempfile.mkdtemp(prefix="packing-cache-"))

    names = config.getoption("--require-kernels")
    if names:
        os.environ["REQUIRE_KERNELS"] = ",".join(filter(None, [os.environ.get("REQUIRE_KERNELS", ""), names]))
