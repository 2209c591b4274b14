"""How fast the samplers read a Hugging Face ``datasets.Dataset``'s lengths, against decoding its rows.

    python -m benchmarks.hf_lengths                        # 10M rows, token counts U[1, 32]
    python -m benchmarks.hf_lengths --rows 1000000 --json out.json

The dataset is built in memory straight from Arrow arrays (``input_ids`` int32 lists, and an int8
``attention_mask`` with one to three padding slots a row). Rows timed, each the best of three:

- ``input_ids``: :func:`packing.data.hf_datasets.lengths_of` over the list offsets;
- ``attention_mask``: the same, counting the mask's ones;
- ``shuffled view``: the attention-mask case through ``dataset.shuffle()``'s indices mapping;
- the baseline, ``[len(x) for x in dataset["input_ids"]]``, which decodes every row into Python lists
  (timed on ``--baseline-rows`` rows and scaled to the full count: decoding all 10M takes minutes).

It prints each row's seconds and its speedup over the baseline of this run.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import numpy as np

from benchmarks.harness import Parser, positive


def build(rows: int, seed: int = 0):
    """(dataset with input_ids and attention_mask, the true lengths)."""
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    real = rng.integers(1, 33, rows, dtype=np.int64)
    pad = rng.integers(1, 4, rows, dtype=np.int64)
    width = real + pad
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(width, out=offsets[1:])
    ids = rng.integers(0, 32000, int(offsets[-1]), dtype=np.int32)
    # Each row: `real` ones, then `pad` zeros.
    position = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], width)
    mask = (position < np.repeat(real, width)).astype(np.int8)
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                      "attention_mask": pa.ListArray.from_arrays(pa.array(offsets), pa.array(mask))})
    return datasets.Dataset(table), real, width


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.hf_lengths", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=positive, default=10_000_000, help="rows (default 10,000,000)")
    p.add_argument("--baseline-rows", type=positive, default=200_000, help="rows the decoding baseline reads")
    p.add_argument("--json", help="write the record here")
    args = p.parse_args(argv)
    import datasets

    from packing.data.hf_datasets import lengths_of

    ds, real, width = build(args.rows)
    ids_only = ds.remove_columns("attention_mask")
    shuffled = ds.shuffle(seed=0)
    n = min(args.baseline_rows, args.rows)
    head = ids_only.select(range(n))
    base_s, base = best_of(lambda: [len(x) for x in head["input_ids"]], repeats=1)
    assert base == width[:n].tolist()
    base_full = base_s * args.rows / n
    rows = []
    for name, data, expected in (("input_ids", ids_only, width), ("attention_mask", ds, real),
                                 ("shuffled view", shuffled, None)):
        seconds, got = best_of(lambda: lengths_of(data))
        if expected is None:
            expected = real[shuffled._indices.column(0).to_numpy()]
        assert np.array_equal(got, expected), name  # the lengths are right, not only fast
        rows.append({"row": name, "seconds": seconds, "speedup_vs_baseline": base_full / seconds})
        print(f"{name:16s} {args.rows:,} rows in {seconds:.3f} s ({base_full / seconds:,.0f}x decoding)", flush=True)
    print(f"baseline: decoding {n:,} rows took {base_s:.3f} s, {base_full:.1f} s for {args.rows:,}")
    record = {"rows": args.rows, "baseline_rows": n, "baseline_seconds_scaled": base_full, "results": rows,
              "command": p.command(argv),
              "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "numpy": np.__version__, "datasets": datasets.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
