"""Rows already packed, as a map-style dataset of their documents, for the samplers.

A dataset written by transformers' ``DataCollatorWithFlattening`` or TRL's ``pack_dataset`` holds
several documents per row, marked by ``position_ids`` that restart at 0 or by a ``seq_lengths``
list. The collators split such a row themselves (:mod:`packing.sample`); ``PackedRows`` goes one
step further and gives each document an index of its own, so ``PackingSampler`` and
``LengthBucketSampler`` plan with documents, not rows: packs fill to the budget, ``max_seqs``
counts documents, and documents of one row may land in different batches.

Each item is the row's dict cut to one document: every per-token key (``input_ids``, ``labels``,
``targets``, the loss masks) sliced, ``position_ids`` and ``seq_lengths`` dropped, other keys kept.
For a ``datasets.Dataset`` the boundaries are read from its Arrow columns without decoding a row;
any other map-style dataset is read once, row by row, at construction.

Examples:
    >>> rows = [{"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]},
    ...         {"input_ids": [6, 7, 8], "seq_lengths": [1, 2]}]
    >>> docs = PackedRows(rows)
    >>> docs.lengths.tolist(), docs[3]
    ([3, 2, 1, 2], {'input_ids': [7, 8]})
"""

from __future__ import annotations

from typing import Any

import numpy as np

from packing.data.hf_datasets import is_hf_dataset
from packing.data.indexed import LengthIndexed
from packing.sample import ROW_KEYS

__all__ = ["PackedRows"]

# Keys cut to the document (aligned with input_ids); the two that mark the boundaries are dropped.
PER_TOKEN = tuple(k for k in ROW_KEYS if k not in ("position_ids", "seq_lengths"))


class PackedRows(LengthIndexed):
    """A map-style view with one item per document of rows already packed (module docstring).

    Attributes:
        lengths: (num_docs,) int64 token counts, for the samplers.
        row, start: (num_docs,) int64: the row each document comes from and its first token there.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        per_row = _arrow_documents(dataset) if is_hf_dataset(dataset) else [
            _row_documents(dataset[r], r) for r in range(len(dataset))]
        counts = np.array([len(d) for d in per_row], dtype=np.int64)
        self._lengths = np.concatenate(per_row).astype(np.int64) if len(per_row) else np.zeros(0, np.int64)
        self.row = np.repeat(np.arange(len(per_row)), counts)
        starts = [np.cumsum(d) - d for d in per_row]
        self.start = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        r, start, n = int(self.row[i]), int(self.start[i]), int(self._lengths[i])
        row = self.dataset[r]
        if len(row["input_ids"]) < start + n:
            raise ValueError(f"row {r} has {len(row['input_ids'])} tokens, fewer than its documents' {start + n}; "
                             "the dataset changed after PackedRows read its boundaries")
        doc = {k: v for k, v in row.items() if k not in ("position_ids", "seq_lengths")}
        for key in PER_TOKEN:
            if doc.get(key) is not None:
                doc[key] = doc[key][start:start + n]
        return doc


def _row_documents(row: Any, r: int) -> np.ndarray:
    """The document lengths of one row (a dict), from seq_lengths or position_ids."""
    if not isinstance(row, dict) or "input_ids" not in row:
        raise TypeError(f"PackedRows takes rows that are dicts with input_ids; row {r} is {type(row).__name__}")
    n = len(row["input_ids"])
    _refuse_padding(row.get("attention_mask"), r)
    if row.get("seq_lengths") is not None:
        lengths = np.asarray(row["seq_lengths"], dtype=np.int64).reshape(-1)
    elif row.get("position_ids") is not None:
        pos = np.asarray(row["position_ids"], dtype=np.int64).reshape(-1)
        lengths = np.diff(np.append(np.flatnonzero(pos == 0), len(pos)))
        if len(pos) == 0 or pos[0] != 0 or not np.array_equal(pos, _restarting(lengths)):
            raise ValueError(f"row {r}: position_ids do not count 0, 1, 2, ... within each document; they are read "
                             "only as document boundaries")
    else:
        raise ValueError(f"row {r} has neither position_ids nor seq_lengths, so it is not a packed row; use the "
                         "dataset itself (one document a row)")
    if lengths.sum() != n or (lengths < 1).any():
        raise ValueError(f"row {r}: its documents' lengths {lengths.tolist()[:8]} do not add up to its {n} tokens")
    return lengths


def _restarting(lengths: np.ndarray) -> np.ndarray:
    """Positions that count from 0 in each document: [0, 1, 2, 0, 1] for lengths [3, 2]."""
    total = int(lengths.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _refuse_padding(mask: Any, r: int) -> None:
    if mask is not None and 0 in list(np.asarray(mask).reshape(-1)):
        raise ValueError(f"row {r} of a packed dataset has padding (attention_mask 0); packed rows carry no padding: "
                         "drop the padding before packing, or leave the row to the collator")


def _arrow_documents(dataset: Any) -> list[np.ndarray]:
    """Per row, its document lengths, from the Arrow columns (seq_lengths, else position_ids)."""
    import pyarrow as pa

    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    names = table.column_names
    if "seq_lengths" not in names and "position_ids" not in names:
        raise ValueError(f"the dataset has columns {names}; a packed dataset has position_ids or seq_lengths")
    if "attention_mask" in names:
        raise ValueError("a packed dataset with an attention_mask column: packed rows carry no padding; drop the "
                         "padding and the column before packing")
    column = table.column("seq_lengths" if "seq_lengths" in names else "position_ids").combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # older pyarrow: one chunk, still chunked
        column = column.chunk(0) if column.num_chunks else pa.array([], type=column.type)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    values = values[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    if "seq_lengths" in names:
        per_row = np.split(values, offsets[1:-1])
    else:
        # A document starts wherever a position is 0: its length runs to the next start or the row's end.
        starts = np.flatnonzero(values == 0)
        bounds = np.union1d(starts, offsets[:-1])
        ends = np.append(bounds[1:], len(values))
        if not np.array_equal(bounds, starts) or not np.array_equal(values, _restarting(ends - bounds)):
            raise ValueError("the dataset's position_ids do not count 0, 1, 2, ... within each document; they are "
                             "read only as document boundaries")
        row_of = np.searchsorted(offsets, bounds, side="right") - 1
        per_row = np.split(ends - bounds, np.searchsorted(row_of, np.arange(1, len(offsets) - 1)))
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        per_row = [per_row[i] for i in indices.column(0).to_numpy()]
    return per_row
