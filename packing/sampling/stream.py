"""Pack a stream of documents into token budgets from a bounded buffer, for iterable datasets."""

from __future__ import annotations

from bisect import bisect_right, insort
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from packing.sample import is_pair
from packing.sampling.source import ResumableSource
from packing.validate import positive_int


def sample_length(sample: Any) -> int:
    """Tokens in a sample of any form :mod:`packing.sample` accepts, without parsing it (a dict row's
    padding, where its attention_mask marks it, is not counted)."""
    if isinstance(sample, dict):
        mask = sample.get("attention_mask")
        return int(sum(mask.tolist() if hasattr(mask, "tolist") else mask)) if mask is not None else len(sample["input_ids"])
    if is_pair(sample):
        return len(sample[0])
    return len(sample)


class _BestFitBuffer:
    """Documents waiting by length; :meth:`take` forms one pack: the longest waiting document, then
    repeatedly the longest that still fits the room left. Items are opaque to it; each carries an int
    key (its stream position), kept in a parallel list so no object is made per document."""

    def __init__(self, max_tokens: int, max_seqs: int | None) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.waiting: dict[int, list[Any]] = {}  # length -> items of that length, in arrival order
        self.keys: dict[int, list[int]] = {}  # length -> their keys, in the same order
        self.present: list[int] = []  # sorted lengths that have waiting items
        self.held = 0

    def add(self, n: int, item: Any, key: int) -> None:
        if n not in self.waiting:
            self.waiting[n], self.keys[n] = [], []
            insort(self.present, n)
        self.waiting[n].append(item)
        self.keys[n].append(key)
        self.held += 1

    def take(self) -> tuple[list[Any], list[int]]:
        """One pack: its items and their keys, in pack order."""
        pack, keys, room = [], [], self.max_tokens
        while self.present and (self.max_seqs is None or len(pack) < self.max_seqs):
            i = bisect_right(self.present, room) - 1  # the longest waiting document that fits
            if i < 0:
                break
            n = self.present[i]
            items = self.waiting[n]
            pack.append(items.pop())
            keys.append(self.keys[n].pop())
            if not items:
                del self.waiting[n], self.keys[n], self.present[i]
            room -= n
        self.held -= len(pack)
        return pack, keys


def pack_sizes(lengths: Iterable[int], *, max_tokens: int, buffer_size: int, max_seqs: int | None = None) -> list[int]:
    """Documents in each pack that :class:`StreamPacker` makes of a stream with these lengths: the
    packing depends on the lengths alone, so every rank can count every rank's packs in advance."""
    buffer, sizes = _BestFitBuffer(max_tokens, max_seqs), []
    for n in lengths:
        buffer.add(int(n), None, 0)
        if buffer.held >= buffer_size:
            sizes.append(len(buffer.take()[0]))
    while buffer.held:
        sizes.append(len(buffer.take()[0]))
    return sizes


class StreamPacker(IterableDataset):
    """Yields packs (lists of samples) of at most ``max_tokens`` tokens from an iterable of samples.

    Documents wait in a buffer of ``buffer_size``. When it is full, one pack is taken: the longest
    waiting document, then repeatedly the longest one that still fits the room left (best fit for a
    single bin). The stream's end flushes the buffer the same way. A 4096-document buffer fills the
    budget almost as well as planning the whole epoch (``python -m benchmarks.samplers`` measures
    both). Nothing is dropped or truncated: a document
    longer than ``max_tokens`` raises ``ValueError``; split it where it enters, with
    ``ShardStream(..., max_len=max_tokens, too_long="split")``.

    Hand each pack to a collator, one pack per step::

        packs = StreamPacker(stream, max_tokens=16384)
        loader = DataLoader(packs, batch_size=None, collate_fn=ConcatCuSeqlens(total_tokens=16384))

    With DataLoader workers, each worker packs the share of ``source`` it iterates; make ``source``
    split itself across workers (``ShardStream`` and webdataset's ``split_by_worker`` do).

    Over a :class:`~packing.data.shard_reader.ShardStream`, the packer is resumable (``state_dict`` /
    ``load_state_dict``, saved per worker by torchdata's ``StatefulDataLoader``): a resumed run gives
    the packs an uninterrupted one would, in the same order. Across several ranks it also evens out
    their pack counts, which DDP needs (see :meth:`_splits`).

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
            positive_int(name, value, optional=name == "max_seqs")
        self.source = source
        self.max_tokens = max_tokens
        self.buffer_size = buffer_size
        self.max_seqs = max_seqs
        self.length = length
        # Which read positions are gone from the buffer (packed, or never read: a skipped shard's), one
        # bool each from position _base; the rest of [_base, _next) still waits. Marked a pack at a
        # time, so a document costs one comparison, and state_dict() is a slice and packbits
        # (turning a dict of 4096 waiting positions into an array took 48 us a call).
        self._gone = np.zeros(0, dtype=bool)
        self._base = 0
        self._next = 0  # the position the next document should have
        self._taken = 0  # takes from the buffer so far this epoch (a split take yields two packs)
        self._pending: list[tuple[int, Any]] = []  # a split pack's second half, not yet yielded
        self._resume: dict[str, Any] | None = None

    # -- resume ---------------------------------------------------------------------------------

    def _resumable_source(self) -> ResumableSource:
        if not isinstance(self.source, ResumableSource):
            raise TypeError(
                f"StreamPacker can save and resume only a packing.sampling.source.ResumableSource (position, state_dict, "
                f"load_state_dict, documents, place, share_lengths), such as packing.ShardStream; got "
                f"{type(self.source).__name__}"
            )
        return self.source

    def state_dict(self) -> dict[str, Any]:
        """Where the packing stands: the source's state and the documents waiting in the buffer, as
        positions in the source (a bitmap from the first waiting one), never tokens. Taken between
        packs, it resumes to the same packs in the same order. The source must be resumable (a
        :class:`~packing.data.shard_reader.ShardStream`)."""
        source = self._resumable_source()
        bits = ~self._gone[: self._next - self._base]  # waiting: read and not gone
        start = int(bits.argmax()) if len(bits) else 0  # the first waiting one (argmax: one pass)
        if len(bits) and not bits[start]:
            start = len(bits)  # none waits
        if hasattr(source, "retain"):  # a source that keeps what it needs to read documents back (HFStream)
            source.retain(self._base + start)
        return {"source": source.state_dict(), "buffer_start": self._base + start,
                # a uint8 tensor, not bytes: torch.load(weights_only=True) takes tensors, not bytes
                "buffer": torch.from_numpy(np.packbits(bits[start:])), "taken": self._taken,
                "pending": [position for position, _ in self._pending],
                "max_tokens": self.max_tokens, "buffer_size": self.buffer_size, "max_seqs": self.max_seqs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` on the next iteration: the source restarts where it was and
        the waiting documents are read back by position. Refused with a ValueError when the state is
        from other packing settings, or when the source refuses its part."""
        source = self._resumable_source()
        expected = {"source", "buffer_start", "buffer", "taken", "pending", "max_tokens", "buffer_size", "max_seqs"}
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

    def _restored(self) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]], int]:
        """From a loaded state: the waiting documents and a split pack's pending half, each as
        (position, sample) in their order, and the takes so far."""
        state, self._resume = self._resume, None
        if state is None:
            return [], [], 0
        start, end = state["buffer_start"], state["source"]["position"]
        bits = np.unpackbits(state["buffer"].numpy(), count=end - start).astype(bool)
        positions = (np.flatnonzero(bits) + start).tolist()
        saved, epoch = state["source"].get("epoch"), getattr(self.source, "epoch", None)
        if saved is not None and epoch is not None and epoch != saved:
            # set_epoch moved the source on: a state whose buffer still held documents would pack
            # them from the other epoch's order; a drained one is simply done.
            if positions or state["pending"]:
                raise ValueError(
                    f"the StreamPacker state was saved in epoch {saved} with {len(positions) + len(state['pending']):,} "
                    f"documents still waiting in its buffer, but its source is now at epoch {epoch}: the state "
                    f"resumes epoch {saved}; call set_epoch({saved}) to finish it, or do not load the state to start "
                    f"epoch {epoch} from its beginning"
                )
            return [], [], 0
        waiting = list(zip(positions, self.source.documents(positions)))
        pending = list(zip(state["pending"], self.source.documents(state["pending"])))
        return waiting, pending, state["taken"]

    def _arrive(self, position: int) -> None:
        """The slow path of a document's arrival: a gap in the positions (a skipped shard, or a
        resume's packed documents) is marked gone, and the array grows when full."""
        if position - self._base >= len(self._gone):  # grow, dropping positions before the first waiting one
            waiting = ~self._gone[: self._next - self._base]
            if not waiting.any():  # nothing waits: start afresh at this position
                self._gone = np.zeros(2 * self.buffer_size, dtype=bool)
                self._base = self._next = position
            else:
                first = int(waiting.argmax())
                kept = self._gone[first: self._next - self._base]
                self._gone = np.zeros(max(2 * (position - self._base - first + 1), 2 * self.buffer_size), dtype=bool)
                self._gone[: len(kept)] = kept
                self._base += first
        self._gone[self._next - self._base: position - self._base] = True
        self._next = position + 1

    def _splits(self) -> set[int]:
        """Which of this worker's packs to split in two so every rank yields as many packs.

        Ranks stream different shards, so their pack counts differ, and DDP hangs on the rank that
        runs out first. Packing depends on lengths alone: from the length indexes every worker counts
        every rank's packs (:func:`pack_sizes`), and a rank short of the largest count splits that
        many of its packs of two or more documents in two, spread over its workers in order. Nothing
        is dropped or duplicated. Empty set: one rank, or a source that cannot tell its shares.
        """
        if not isinstance(self.source, ResumableSource):
            return set()
        place = self.source.place()
        world, workers = place["world_size"], place["num_workers"]
        if world == 1:
            return set()
        sizes = {(r, w): pack_sizes(self.source.share_lengths(r, w, world, workers), max_tokens=self.max_tokens,
                                    buffer_size=self.buffer_size, max_seqs=self.max_seqs)
                 for r in range(world) for w in range(workers)}
        counts = [sum(len(sizes[r, w]) for w in range(workers)) for r in range(world)]
        deficit = max(counts) - counts[place["rank"]]
        splittable = [[i for i, k in enumerate(sizes[place["rank"], w]) if k >= 2] for w in range(workers)]
        if deficit > sum(map(len, splittable)):
            raise ValueError(
                f"rank {place['rank']} gets {counts[place['rank']]} packs from its shards and rank "
                f"{counts.index(max(counts))} gets {max(counts)}; splitting all its {sum(map(len, splittable))} packs "
                "of two or more documents cannot even them out: write more, smaller shards (python -m packing.data.shards "
                "--shard-size), or use fewer ranks or DataLoader workers"
            )
        for w in range(workers):  # the deficit goes to the workers in order, as far as each can split
            mine = splittable[w][:deficit]
            deficit -= len(mine)
            if w == place["worker"]:
                return set(mine)
        return set()

    def __iter__(self) -> Iterator[list[Any]]:
        buffer = _BestFitBuffer(self.max_tokens, self.max_seqs)
        resumable = isinstance(self.source, ResumableSource)
        restored, pending, taken = self._restored()
        self._gone = np.zeros(2 * self.buffer_size, dtype=bool)
        self._base = self._next = restored[0][0] if restored else 0
        splits = self._splits() if resumable else set()
        self._taken, self._pending = taken, []

        def add(position: int, sample: Any) -> None:
            n = self.length(sample)
            if not 1 <= n <= self.max_tokens:
                raise ValueError(
                    f"document {position} of the stream has length {n}; StreamPacker takes 1 to max_tokens="
                    f"{self.max_tokens} tokens. Split long documents where they enter: ShardStream(..., "
                    f"max_len={self.max_tokens}, too_long='split') (or 'truncate'); filter empty ones"
                )
            buffer.add(n, sample, position)
            if position == self._next and position - self._base < len(self._gone):  # the usual case, inline
                self._next += 1
            else:
                self._arrive(position)

        def packs() -> Iterator[list[Any]]:
            """One take: a pack, or a split pack's two halves (the second held as pending)."""
            pack, positions = buffer.take()
            self._gone[np.asarray(positions) - self._base] = True  # all within the array
            self._taken += 1
            if self._taken - 1 in splits:
                half = len(pack) // 2
                self._pending = list(zip(positions[half:], pack[half:]))  # saved with the state until yielded
                yield pack[:half]
                pack, self._pending = pack[half:], []
            yield pack

        if pending:
            yield [sample for _, sample in pending]
        for position, sample in restored:
            add(position, sample)
        for count, sample in enumerate(self.source):
            add(self.source.position - 1 if resumable else count, sample)
            if buffer.held >= self.buffer_size:
                yield from packs()
        while buffer.held:
            yield from packs()
