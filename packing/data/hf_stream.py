"""A Hugging Face ``datasets.IterableDataset`` as a resumable stream for :class:`~packing.StreamPacker`.

``StreamPacker(HFStream(iterable), max_tokens=...)`` packs the stream's rows (dicts, read in
transformers' and TRL's conventions by :mod:`packing.sample`), and ``state_dict()`` /
``load_state_dict()`` resume it exactly: the same packs, in the same order, as a run that was never
stopped. The packer saves the documents waiting in its buffer as stream positions, never tokens;
this stream reads them back by replaying its dataset from a snapshot of the dataset's own
``state_dict()`` taken every ``snapshot_every`` rows (only the snapshots at or after the first
waiting document are kept and saved).

Refused by name rather than resumed wrong:

- an ``IterableDataset.shuffle(buffer_size=...)``: datasets does not save its shuffle buffer, so a
  resumed run would read other rows (shuffle the rows once before ``to_iterable_dataset``, or use a
  map-style ``Dataset``, instead);
- several ranks: a rank cannot count another rank's rows without reading them, so the ranks' pack
  counts could differ and DDP would wait forever (use a map-style ``Dataset`` with
  ``PackingSampler``, or shards with ``ShardStream``);
- a state from another dataset (its ``n_shards`` and first rows' fingerprint), epoch, or
  ``snapshot_every``.

Examples:
    >>> import datasets
    >>> from packing import StreamPacker
    >>> rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]})
    >>> packer = StreamPacker(HFStream(rows.to_iterable_dataset()), max_tokens=5, buffer_size=2)
    >>> [[len(r["input_ids"]) for r in pack] for pack in packer]
    [[3, 2], [4, 1]]
"""

from __future__ import annotations

import copy
import zlib
from typing import Any, Iterator

import numpy as np

from packing.distributed import rank as current_rank
from packing.distributed import world_size
from packing.validate import positive_int

__all__ = ["HFStream"]


class HFStream:
    """A ``datasets.IterableDataset`` that knows its place (a
    :class:`~packing.sampling.source.ResumableSource`); see the module docstring.

    Args:
        dataset: the ``datasets.IterableDataset`` (rows with ``input_ids``).
        snapshot_every: rows between snapshots of the dataset's state; a resume replays at most this
            many rows before the first waiting document.
    """

    def __init__(self, dataset: Any, *, snapshot_every: int = 1024) -> None:
        if not all(hasattr(dataset, m) for m in ("state_dict", "load_state_dict", "set_epoch", "n_shards")):
            raise TypeError(f"HFStream takes a datasets.IterableDataset (datasets >= 2.18), got {type(dataset).__name__}")
        positive_int("snapshot_every", snapshot_every)
        _refuse_buffer_shuffle(dataset)
        self.dataset, self.snapshot_every = dataset, snapshot_every
        self.epoch = 0
        self.position = 0
        self._snapshots: dict[int, dict] = {}  # position -> the dataset's state before that row
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        raise TypeError("an HFStream has no length: it is read as a stream")

    def __iter__(self) -> Iterator[Any]:
        state, self._resume = self._resume, None
        if state is None:
            self.position, self._snapshots = 0, {0: {}}  # {}: the epoch's start
            rows = self._rows_from({})
        else:
            self.position = state["position"]
            self._snapshots = {int(k): v for k, v in state["snapshots"].items()}
            rows = self._rows_from(state["dataset"])
        for row in rows:
            self.position += 1
            if self.position % self.snapshot_every == 0:
                # The dataset's state now is the one before the row at this position: a replay
                # from it reads that row first.
                self._snapshots[self.position] = copy.deepcopy(self.dataset.state_dict())
            yield row

    def _rows_from(self, state: dict) -> Iterator[Any]:
        """The rows of this epoch from a state of the dataset's (``{}``: the epoch's start)."""
        self.dataset.set_epoch(self.epoch)
        if state:
            self.dataset.load_state_dict(state)
        else:
            # datasets keeps a loaded state for every later iteration of the same epoch; from the
            # start means without it.
            self.dataset._starting_state_dict = None  # noqa: SLF001
        return iter(self.dataset)

    # -- ResumableSource -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch": self.epoch, "dataset": copy.deepcopy(self.dataset.state_dict()),
                "snapshots": dict(self._snapshots), "snapshot_every": self.snapshot_every,
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"position", "epoch", "dataset", "snapshots", "snapshot_every", "fingerprint"}
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"HFStream state has keys {sorted(state) if isinstance(state, dict) else state!r}, "
                             f"expected {sorted(expected)}")
        for key, mine in (("fingerprint", self._fingerprint()), ("snapshot_every", self.snapshot_every)):
            if state[key] != mine:
                raise ValueError(
                    f"HFStream state was saved with {key}={state[key]!r}, this stream has {key}={mine!r}: "
                    + ("another dataset (its shard count and first row differ); resume with the dataset it was saved from"
                       if key == "fingerprint" else f"construct it with {key}={state[key]} to resume")
                )
        self.epoch = state["epoch"]
        self._resume = state

    def retain(self, first: int) -> None:
        """Positions before ``first`` will not be asked for again: drop the snapshots before the last
        one at or before it (StreamPacker calls this when it saves its state)."""
        keep = max((p for p in self._snapshots if p <= first), default=None)
        self._snapshots = {p: s for p, s in self._snapshots.items() if keep is None or p >= keep}

    def documents(self, positions: list[int]) -> list[Any]:
        """The rows at these positions of this epoch, in the order given: replayed from the last
        snapshot at or before the first of them."""
        if not positions:
            return []
        state = self._resume
        snapshots = {int(k): v for k, v in (state["snapshots"] if state else self._snapshots).items()}
        start = max((p for p in snapshots if p <= min(positions)), default=None)
        if start is None:
            raise ValueError(f"HFStream has no snapshot at or before position {min(positions)}; the state is incomplete")
        replay = self._rows_from(snapshots[start])
        wanted, found, position = set(positions), {}, start
        for row in replay:
            if position in wanted:
                found[position] = row
                if len(found) == len(wanted):
                    break
            position += 1
        missing = sorted(wanted - set(found))
        if missing:
            raise ValueError(f"HFStream: the dataset ended before position {missing[0]}; it is not the one the state "
                             "was saved from")
        return [found[p] for p in positions]

    def place(self) -> dict[str, int]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        return {"rank": current_rank(), "world_size": world_size(), "worker": info.id if info else 0,
                "num_workers": info.num_workers if info else 1}

    def share_lengths(self, rank: int, worker: int, world_size: int, num_workers: int) -> np.ndarray:
        raise ValueError(
            f"HFStream over {world_size} ranks: a rank cannot count another rank's rows of a datasets.IterableDataset "
            "without reading them, so the ranks' pack counts could differ and DDP would wait forever; use a map-style "
            "datasets.Dataset with PackingSampler, or shards with ShardStream"
        )

    def _fingerprint(self) -> str:
        """The shard count and a CRC-32 of the first row's first ids: enough to tell datasets apart
        without reading more than one row."""
        first = next(iter(self.dataset.take(1)), None)
        ids = list(first.get("input_ids", []))[:64] if isinstance(first, dict) else []
        return f"shards={self.dataset.n_shards} crc={zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())}"


def _refuse_buffer_shuffle(dataset: Any) -> None:
    """A ValueError when the dataset's chain of example iterables holds a shuffle buffer."""
    pending = [getattr(dataset, "_ex_iterable", None)]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            raise ValueError(
                "HFStream: this IterableDataset is shuffled with a buffer (shuffle(buffer_size=...)), whose contents "
                "datasets does not save, so a resumed run would read other rows; keep the rows in a fixed order "
                "(shuffle them once before to_iterable_dataset), or use a map-style datasets.Dataset with PackingSampler"
            )
        pending += [getattr(node, "ex_iterable", None), *getattr(node, "ex_iterables", [])]
