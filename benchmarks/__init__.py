"""The benchmark harness and its entry points (python -m benchmarks.X), run from the repository root."""
