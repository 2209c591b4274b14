"""Pack a stream of documents into token budgets from a bounded buffer, for iterable datasets."""

from __future__ import annotations

from bisect import bisect_right, insort
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from torch.utils.data import IterableDataset

from packing.sample import is_pair


def sample_length(sample: Any) -> int:
    """Tokens in a sample of any form :mod:`packing.sample` accepts, without parsing it."""
    if isinstance(sample, dict):
        return len(sample["input_ids"])
    if is_pair(sample):
        return len(sample[0])
    return len(sample)


class StreamPacker(IterableDataset):
    """Yields packs (lists of samples) of at most ``max_tokens`` tokens from an iterable of samples.

    Documents wait in a buffer of ``buffer_size``. When it is full, one pack is taken: the longest
    waiting document, then repeatedly the longest one that still fits the room left (best fit for a
    single bin). The stream's end flushes the buffer the same way. With a 4096-document buffer on
    the seed distribution this fills 99.9% of a 16,384-token budget (``python -m
    benchmarks.samplers``). Nothing is dropped or truncated: a document longer than ``max_tokens``
    raises ``ValueError``.

    Hand each pack to a collator, one pack per step::

        packs = StreamPacker(stream, max_tokens=16384)
        loader = DataLoader(packs, batch_size=None, collate_fn=ConcatCuSeqlens(total_tokens=16384))

    With DataLoader workers, each worker packs the share of ``source`` it iterates; make ``source``
    split itself across workers (webdataset's ``split_by_worker`` does).

    Args:
        source: an iterable of samples (token ids, dicts with ``input_ids``, or (inputs, targets)).
        max_tokens: the token budget of one pack.
        buffer_size: documents held at most; a larger buffer packs tighter and holds more memory.
        max_seqs: at most this many documents per pack (None: no limit).
        length: how to measure a sample (default: its token count).
    """

    def __init__(
        self,
        source: Iterable[Any],
        *,
        max_tokens: int,
        buffer_size: int = 4096,
        max_seqs: int | None = None,
        length: Callable[[Any], int] = sample_length,
    ) -> None:
        for name, value in (("max_tokens", max_tokens), ("buffer_size", buffer_size), ("max_seqs", max_seqs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} is {value!r}; expected a positive int")
        self.source = source
        self.max_tokens = max_tokens
        self.buffer_size = buffer_size
        self.max_seqs = max_seqs
        self.length = length
        # Which read positions still wait in the buffer, one bool each from position _base: kept as
        # the documents come and go, so state_dict() is a slice and packbits (a dict of positions
        # turned into an array cost 48 us a call at 4096 documents, 3.6% of streaming throughput).
        self._waiting = np.zeros(0, dtype=bool)
        self._base = 0
        self._resume: dict[str, Any] | None = None

    # -- resume ---------------------------------------------------------------------------------

    def _resumable_source(self) -> Any:
        if not all(hasattr(self.source, a) for a in ("state_dict", "load_state_dict", "documents", "position")):
            raise TypeError(
                f"StreamPacker can save and resume only a source with state_dict, load_state_dict, position and "
                f"documents(positions), such as packing.ShardStream; got {type(self.source).__name__}"
            )
        return self.source

    def state_dict(self) -> dict[str, Any]:
        """Where the packing stands: the source's state and the documents waiting in the buffer, as
        positions in the source (a bitmap from the first waiting one), never tokens. Taken between
        packs, it resumes to the same packs in the same order. The source must be resumable (a
        :class:`~packing.shard_reader.ShardStream`)."""
        source = self._resumable_source()
        bits = self._waiting[: source.position - self._base]  # one bool a read position, from _base
        start = int(bits.argmax()) if bits.any() else len(bits)
        return {"source": source.state_dict(), "buffer_start": self._base + start,
                "buffer": np.packbits(bits[start:]).tobytes(),
                "max_tokens": self.max_tokens, "buffer_size": self.buffer_size, "max_seqs": self.max_seqs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` on the next iteration: the source restarts where it was and
        the waiting documents are read back by position. Refused with a ValueError when the state is
        from other packing settings, or when the source refuses its part."""
        source = self._resumable_source()
        expected = {"source", "buffer_start", "buffer", "max_tokens", "buffer_size", "max_seqs"}
        if set(state) != expected:
            raise ValueError(f"StreamPacker state has keys {sorted(state)}, expected {sorted(expected)}")
        for key in ("max_tokens", "buffer_size", "max_seqs"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"StreamPacker state was saved with {key}={state[key]}, this packer has {key}={getattr(self, key)}; "
                    f"other settings make other packs: construct it with {key}={state[key]} to resume"
                )
        source.load_state_dict(state["source"])
        self._resume = state

    def _restored(self) -> list[tuple[int, Any]]:
        """The waiting documents of a loaded state, (position, sample) in read order."""
        state, self._resume = self._resume, None
        if state is None:
            return []
        start, end = state["buffer_start"], state["source"]["position"]
        bits = np.unpackbits(np.frombuffer(state["buffer"], dtype=np.uint8), count=end - start).astype(bool)
        positions = (np.flatnonzero(bits) + start).tolist()
        return list(zip(positions, self.source.documents(positions)))

    def _mark(self, position: int, waiting: bool) -> None:
        i = position - self._base
        if i >= len(self._waiting):  # grow, dropping the positions before the first waiting one
            first = int(self._waiting.argmax()) if self._waiting.any() else i
            kept = self._waiting[first:]
            self._waiting = np.zeros(max(2 * (i - first + 1), 2 * self.buffer_size), dtype=bool)
            self._waiting[: len(kept)] = kept
            self._base += first
            i = position - self._base
        self._waiting[i] = waiting

    def __iter__(self) -> Iterator[list[Any]]:
        waiting: dict[int, list[tuple[int, Any]]] = {}  # length -> (position, document) of that length
        present: list[int] = []  # sorted lengths that have waiting documents
        resumable = hasattr(self.source, "position")
        restored = self._restored()
        self._waiting, self._base = np.zeros(2 * self.buffer_size, dtype=bool), restored[0][0] if restored else 0
        held = 0

        def take_pack() -> list[Any]:
            nonlocal held
            pack, room = [], self.max_tokens
            while present and (self.max_seqs is None or len(pack) < self.max_seqs):
                i = bisect_right(present, room) - 1  # the longest waiting document that fits
                if i < 0:
                    break
                n = present[i]
                docs = waiting[n]
                position, sample = docs.pop()
                self._mark(position, False)
                pack.append(sample)
                if not docs:
                    del waiting[n], present[i]
                room -= n
            held -= len(pack)
            return pack

        def add(position: int, sample: Any) -> None:
            nonlocal held
            n = self.length(sample)
            if not 1 <= n <= self.max_tokens:
                raise ValueError(
                    f"document {position} of the stream has length {n}; StreamPacker takes 1 to max_tokens="
                    f"{self.max_tokens} tokens. Filter empty documents, or split long ones before packing"
                )
            if n not in waiting:
                waiting[n] = []
                insort(present, n)
            waiting[n].append((position, sample))
            self._mark(position, True)
            held += 1

        for position, sample in restored:
            add(position, sample)
        for count, sample in enumerate(self.source):
            add(self.source.position - 1 if resumable else count, sample)
            if held >= self.buffer_size:
                yield take_pack()
        while held:
            yield take_pack()
