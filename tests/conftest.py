# Subprocess entry points the tests launch (torchrun, SIGKILL); they are not test modules, and
# --doctest-modules must not import them in the test process.
collect_ignore_glob = ["*_worker.py"]
