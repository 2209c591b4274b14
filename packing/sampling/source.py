"""What :class:`~packing.sampling.stream.StreamPacker` needs from a source to save, resume and even
out ranks: the :class:`ResumableSource` protocol. ``packing.ShardStream`` implements it; any
iterable of samples can be packed, but only a ``ResumableSource`` can be resumed.

Examples:
    >>> import tempfile, numpy as np
    >>> from packing import ShardStream
    >>> from packing.data.shards import ShardWriter
    >>> out = tempfile.mkdtemp()
    >>> with ShardWriter(out, vocab_size=8, tokenizer="t") as w:
    ...     w.write("a", np.array([1, 2, 3]))
    >>> isinstance(ShardStream(out), ResumableSource), isinstance([[1, 2, 3]], ResumableSource)
    (True, False)
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ResumableSource(Protocol):
    """An iterable of samples that knows its place.

    - ``position``: how many samples of this process's share it has yielded this epoch (a skipped
      one counts: positions name samples, not yields);
    - ``state_dict()`` / ``load_state_dict(state)``: save and restore that place; a state from
      other data or settings is refused with a ``ValueError``;
    - ``documents(positions)``: the samples at these positions of this epoch's share, in that order
      (the packer's buffer is saved as positions and read back);
    - ``place()``: ``{"rank", "world_size", "worker", "num_workers"}`` of this process;
    - ``share_lengths(rank, worker, world_size, num_workers)``: (n,) int lengths of any share's
      samples in stream order, without reading them (every rank counts every rank's packs).
    """

    position: int

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def documents(self, positions: list[int]) -> list[Any]: ...

    def place(self) -> dict[str, int]: ...

    def share_lengths(self, rank: int, worker: int, world_size: int, num_workers: int) -> np.ndarray: ...
