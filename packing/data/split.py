"""Documents longer than a budget, made to fit: split into consecutive chunks, or truncated."""

from __future__ import annotations

from typing import Any

import numpy as np

from packing.boundaries import ceil_div
from packing.data.indexed import LengthIndexed
from packing.sample import IGNORE_INDEX, Sample, as_sample
from packing.validate import positive_int

MODES = ("split", "truncate")


def chunk_plan(lengths: np.ndarray, max_len: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, length) per chunk: each document cut into pieces of at most ``max_len`` tokens
    ("split"), or cut to its first ``max_len`` ("truncate"). Chunks are in document order.

    Example: lengths [5, 2], max_len 2, "split" -> doc [0, 0, 0, 1], start [0, 2, 4, 0], length [2, 2, 1, 2].
    """
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES}")
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = np.maximum(ceil_div(lengths, max_len), 1) if mode == "split" else np.ones_like(lengths)
    doc = np.repeat(np.arange(len(lengths)), chunks)
    first = np.cumsum(chunks) - chunks
    start = (np.arange(len(doc)) - first[doc]) * max_len  # token offset in the document
    return doc, start, np.minimum(lengths[doc] - start, max_len)


class SplitDocuments(LengthIndexed):
    """A map-style view of ``dataset`` in which no document is longer than ``max_len``.

    ``mode="split"`` cuts a long document into consecutive chunks of ``max_len`` tokens (the last
    one shorter); every token is kept, and each chunk's targets are the document's own next tokens,
    so the last target of a chunk is the first token of the next (it is the same document).
    ``mode="truncate"`` keeps the first ``max_len`` tokens and counts the rest in
    ``dropped_tokens``. Short documents pass through unchanged.

    ``lengths`` gives the chunk lengths without loading any sample, for the samplers.

    Example:
        >>> view = SplitDocuments([[1, 2, 3, 4, 5], [6, 7]], [5, 2], max_len=2)
        >>> view.lengths.tolist(), [view[i].input_ids.tolist() for i in range(len(view))]
        ([2, 2, 1, 2], [[1, 2], [3, 4], [5], [6, 7]])
    """

    def __init__(self, dataset: Any, lengths: Any, *, max_len: int, mode: str = "split",
                 ignore_index: int = IGNORE_INDEX) -> None:
        positive_int("max_len", max_len)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries but the dataset has {len(dataset)} documents")
        self.dataset, self.max_len, self.mode, self.ignore_index = dataset, max_len, mode, ignore_index
        self._doc, self._start, self._lengths = chunk_plan(lengths, max_len, mode)  # (num_chunks,) each
        self.num_split = int((lengths > max_len).sum()) if mode == "split" else 0
        self.dropped_tokens = int(np.maximum(lengths - max_len, 0).sum()) if mode == "truncate" else 0
        self.num_truncated = int((lengths > max_len).sum()) if mode == "truncate" else 0

    def __getitem__(self, i: int) -> Sample:
        i = self._index(i)
        doc, start = int(self._doc[i]), int(self._start[i])
        sample = as_sample(self.dataset[doc], doc, ignore_index=self.ignore_index)
        end = start + int(self._lengths[i])
        return Sample(sample.input_ids[start:end], sample.labels[start:end])
