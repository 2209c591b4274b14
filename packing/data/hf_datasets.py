"""Hugging Face ``datasets`` in: a map-style ``Dataset``'s document lengths, read from its Arrow
columns without decoding a row, for the samplers.

``PackingSampler(dataset, ...)`` and ``LengthBucketSampler(dataset, ...)`` call :func:`lengths_of`
on a ``datasets.Dataset``; ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)`` then
hands the collator its rows as dicts, which :mod:`packing.sample` reads in transformers' and TRL's
conventions.

A row's length is its token count as the collator will see it:

- ``input_ids`` alone: the list's length (Arrow keeps it in the offsets: nothing is decoded);
- with ``attention_mask``: its ones (the padding a tokenizer added is not a token);
- a row already packed (``position_ids`` or ``seq_lengths``): all its documents' tokens together.

``select``, ``shuffle`` and ``filter`` views are followed through their indices mapping. How fast
it is on ten million rows: ``python -m benchmarks.hf_lengths`` (the README quotes its record).

Examples:
    >>> import datasets
    >>> ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 0], [8, 9, 0, 0]],
    ...                                  "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0]]})
    >>> lengths_of(ds).tolist()
    [3, 2]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_hf_dataset", "lengths_of"]


def is_hf_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a map-style ``datasets.Dataset`` (checked without importing datasets)."""
    return any(c.__module__.startswith("datasets.") and c.__name__ == "Dataset" for c in type(obj).__mro__)


def lengths_of(dataset: Any) -> np.ndarray:
    """(num_rows,) int64: each row's token count, read from the Arrow columns (module docstring)."""
    if not is_hf_dataset(dataset):
        raise TypeError(f"lengths_of takes a datasets.Dataset, got {type(dataset).__name__}")
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    if "input_ids" not in table.column_names:
        raise ValueError(
            f"the dataset has columns {table.column_names}; the samplers need 'input_ids' (token ids per row): "
            "tokenize it first, e.g. dataset.map(lambda row: tokenizer(row['text']))"
        )
    ids = table.column("input_ids")
    if not (pa.types.is_list(ids.type) or pa.types.is_large_list(ids.type) or pa.types.is_fixed_size_list(ids.type)):
        raise TypeError(f"the dataset's input_ids column has Arrow type {ids.type}; expected a list of token ids per row")
    if "attention_mask" in table.column_names:
        lengths = np.concatenate([_row_sums(chunk) for chunk in table.column("attention_mask").chunks] or [np.zeros(0)])
    else:
        lengths = pc.list_value_length(ids)
        if lengths.null_count:
            row = int(np.flatnonzero(lengths.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"row {row} of the dataset has input_ids None; every row needs token ids (filter it out)")
        lengths = lengths.to_numpy()
    lengths = np.asarray(lengths, dtype=np.int64)
    indices = getattr(dataset, "_indices", None)  # the mapping select/shuffle/filter leave on the table
    if indices is not None:
        lengths = lengths[indices.column(0).to_numpy()]
    return lengths


def _row_sums(chunk: Any) -> np.ndarray:
    """Per-row sums of one chunk of a list column of 0/1 (attention_mask), without a Python loop."""
    import pyarrow as pa

    if chunk.null_count:
        raise ValueError("the dataset's attention_mask column holds a None row; every row needs its mask")
    if pa.types.is_fixed_size_list(chunk.type):
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(-1, chunk.type.list_size).sum(axis=1, dtype=np.int64)
    offsets = chunk.offsets.to_numpy()
    values = chunk.values.to_numpy(zero_copy_only=False)[: offsets[-1]]
    starts, ends = offsets[:-1], offsets[1:]
    sums = np.zeros(len(starts), dtype=np.int64)
    filled = ends > starts
    if filled.any():
        # One pass over the mask, summed per row in place (reduceat), not a running sum of every value:
        # a row's segment runs to the next non-empty row's start, and empty rows hold no value.
        sums[filled] = np.add.reduceat(values, starts[filled], dtype=np.int64)
    return sums
