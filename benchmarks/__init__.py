import packing._moved  # noqa: F401  (python -m benchmarks.padding_report still runs, as packing.report)
