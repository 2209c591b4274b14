"""The map-style dataset the samplers read: its documents' lengths are known without loading one."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


class LengthIndexed(Dataset):
    """Base class: ``lengths`` is a (num_docs,) int64 array of token counts, read without loading any
    document, which is what ``PackingSampler`` and ``LengthBucketSampler`` plan from. Subclasses set
    ``_lengths`` and implement ``__getitem__``, normalising the index with :meth:`_index`.

    Examples:
        >>> from packing import SyntheticDocs
        >>> docs = SyntheticDocs(3, max_len=8, seed=0)
        >>> len(docs) == len(docs.lengths), docs._index(-1)
        (True, 2)
    """

    _lengths: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """(num_docs,) int64 token count of each item."""
        return self._lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def _index(self, i: int) -> int:
        """``i`` as an index in [0, len), negative counting from the end; IndexError out of range."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        return i % len(self)
