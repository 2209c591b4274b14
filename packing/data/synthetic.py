"""The seed article's synthetic documents, seeded and reproducible."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from packing.data.indexed import LengthIndexed


class SyntheticDocs(LengthIndexed):
    """Random documents with the seed article's distribution.

    Document ``i`` is a token sequence ``seq`` of ``lengths[i] + 1`` ids drawn uniformly from
    [1, vocab_size - 1] (0 is left for padding); the sample is the pair
    ``(inputs, targets) = (seq[:-1], seq[1:])``, each of length ``lengths[i]``, uniform in
    [1, max_len - 1]. Everything is a pure function of ``(seed, i)``, so any worker, rank or
    collator sees the same document ``i``.

    Args:
        num_docs: how many documents.
        max_len: lengths are uniform in [1, max_len - 1].
        vocab_size: ids are uniform in [1, vocab_size - 1].
        seed: the seed for lengths and tokens.

    Examples:
        >>> docs = SyntheticDocs(100, max_len=1024, seed=0)
        >>> inputs, targets = docs[3]
        >>> len(inputs) == docs.lengths[3] and bool((inputs[1:] == targets[:-1]).all())
        True
    """

    def __init__(self, num_docs: int, *, max_len: int = 1024, vocab_size: int = 1024, seed: int = 0) -> None:
        if num_docs < 1:
            raise ValueError(f"num_docs is {num_docs}; expected >= 1")
        if max_len < 2:
            raise ValueError(f"max_len is {max_len}; expected >= 2 so lengths in [1, max_len - 1] exist")
        if vocab_size < 2:
            raise ValueError(f"vocab_size is {vocab_size}; expected >= 2 (id 0 is padding)")
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.seed = seed
        self._lengths = np.random.default_rng([seed, 0]).integers(1, max_len, size=num_docs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        i = self._index(i)
        rng = np.random.default_rng([self.seed, 1, i])
        seq = torch.from_numpy(rng.integers(1, self.vocab_size, size=int(self._lengths[i]) + 1))
        return seq[:-1], seq[1:]
