"""Read the shards that ``python -m packing.data.shards`` writes: map-style with lengths, or streamed.

Both readers check each shard against the length index beside it before yielding anything from it:
the member count, that every member's bytes lie inside the file, and, as each document is read,
that its token count matches. A truncated or corrupt shard raises ``ValueError`` naming the shard;
with ``skip_corrupt=True`` it is skipped instead, listed in ``skipped`` and warned about. (A plain
``webdataset.WebDataset`` reads a truncated tar up to the cut and stops without a word: checked with
webdataset 1.0.2, a shard cut mid-archive yielded 1 of its 3 documents.) Only ``tokens.npy`` and
``id.txt`` members are decoded, with ``np.load(..., allow_pickle=False)``; nothing is unpickled.

Example:
    >>> import tempfile, numpy as np
    >>> from packing.data.shards import ShardWriter
    >>> out = tempfile.mkdtemp()
    >>> with ShardWriter(out, vocab_size=259, tokenizer="bytes", shard_size=2) as w:
    ...     for i in range(3):
    ...         w.write(f"doc{i}", np.arange(1, i + 2, dtype=np.uint16))
    >>> ds = ShardDataset(out)
    >>> ds.lengths.tolist(), ds[2].tolist(), ds.doc_id(2)
    ([1, 2, 3], [1, 2, 3], 'doc2')
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import warnings
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset

from packing.data.indexed import LengthIndexed
from packing.data.shards import DOC_ID, TOKENS


def expand_shards(spec: str | Path | list[str]) -> list[str]:
    """Shard paths from a list, a directory (its index.json), braces ``shard-{000000..000009}.tar``,
    or a glob ``shards/*.tar``. A path that does not exist is an error, not an empty list."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        index = Path(spec) / "index.json"
        if not index.is_file():
            raise ValueError(f"{spec!r} has no index.json; write shards with python -m packing.data.shards")
        return [str(Path(spec) / s["tar"]) for s in json.loads(index.read_text())["shards"]]
    paths: list[str] = []
    for pattern in braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise ValueError(f"no shard at {pattern!r}; check the path (braces and globs are expanded)")
        paths += matches
    return paths


@dataclass(frozen=True)
class ShardInfo:
    """Where each document of one shard lies: (docs,) arrays of lengths, byte offsets and sizes."""

    path: str
    lengths: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    id_offsets: np.ndarray
    id_sizes: np.ndarray


def _index_path(path: str) -> str:
    return path[: -len(".tar")] + ".lengths.npy" if path.endswith(".tar") else path + ".lengths.npy"


def _index_size(path: str) -> int:
    return os.path.getsize(_index_path(path)) if os.path.isfile(_index_path(path)) else -1


def scan_shard(path: str) -> ShardInfo:
    """Read a shard's tar headers and its length index, and check that they agree."""
    sidecar = _index_path(path)
    if not os.path.isfile(sidecar):
        raise ValueError(f"shard {path} has no length index {os.path.basename(sidecar)} beside it; "
                         "write shards with python -m packing.data.shards")
    try:
        lengths = np.load(sidecar, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"shard {path}: its length index {os.path.basename(sidecar)} is unreadable ({e})") from None
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or (len(lengths) and lengths.min() < 1):
        raise ValueError(f"shard {path}: its length index is not a 1-D array of positive ints")
    size = os.path.getsize(path)
    tokens, ids = {}, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == TOKENS:
                    tokens[key] = (m.offset_data, m.size)
                elif ext == DOC_ID:
                    ids[key] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"shard {path} is corrupt or truncated ({e})") from None
    keys = sorted(tokens)
    if len(keys) != len(lengths) or sorted(ids) != keys:
        raise ValueError(f"shard {path} is corrupt or truncated: {len(keys)} token arrays and {len(ids)} ids "
                         f"for {len(lengths)} documents in its length index")
    offsets, sizes = (np.array([tokens[k][i] for k in keys], dtype=np.int64) for i in (0, 1))
    id_offsets, id_sizes = (np.array([ids[k][i] for k in keys], dtype=np.int64) for i in (0, 1))
    if len(keys) and max((offsets + sizes).max(), (id_offsets + id_sizes).max()) > size:
        raise ValueError(f"shard {path} is truncated: members extend past its {size} bytes")
    return ShardInfo(path, lengths.astype(np.int64), offsets, sizes, id_offsets, id_sizes)


def _scan_all(paths: list[str], skip_corrupt: bool) -> tuple[list[ShardInfo], list[tuple[str, str]]]:
    infos, skipped = [], []
    for path in paths:
        try:
            infos.append(scan_shard(path))
        except ValueError as e:
            if not skip_corrupt:
                raise ValueError(f"{e}; pass skip_corrupt=True to skip such shards and report them") from None
            skipped.append((path, str(e)))
            warnings.warn(f"skipping {e}", stacklevel=3)
    return infos, skipped


class _ShardFiles:
    """Open file handles per process: DataLoader workers each get their own after fork or spawn."""

    def __init__(self) -> None:
        self._pid, self._files = None, {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._pid, self._files = os.getpid(), {}
        f = self._files.get(path) or self._files.setdefault(path, open(path, "rb"))
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"shard {path} is truncated: wanted {size} bytes at {offset}, got {len(data)}")
        return data

    def __getstate__(self) -> dict:
        return {}  # handles never travel to a worker

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _decode_tokens(data: bytes, path: str, position: int, length: int) -> torch.Tensor:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"shard {path}: document {position} is not a readable .npy ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or len(arr) != length:
        raise ValueError(f"shard {path}: document {position} holds {arr.dtype} {arr.shape}, "
                         f"but the length index says {length} tokens")
    return torch.from_numpy(arr.astype(np.int64))


class ShardDataset(LengthIndexed):
    """Map-style access to every document of some shards, with their lengths for the samplers.

    ``ds[i]`` is document ``i``'s token ids, a 1-D int64 tensor (collators derive the targets).
    ``ds.lengths`` comes from the length indexes, without reading any tokens.

    Args:
        shards: a directory written by ``python -m packing.data.shards``, a brace or glob pattern, or a list.
        skip_corrupt: skip a truncated or corrupt shard (listed in ``skipped``) instead of raising.
    """

    def __init__(self, shards: str | Path | list[str], *, skip_corrupt: bool = False) -> None:
        self.infos, self.skipped = _scan_all(expand_shards(shards), skip_corrupt)
        if not self.infos:
            raise ValueError(f"no readable shard in {shards!r}")
        self._lengths = np.concatenate([i.lengths for i in self.infos])
        self._shard = np.repeat(np.arange(len(self.infos)), [len(i.lengths) for i in self.infos])
        self._first = np.cumsum([0] + [len(i.lengths) for i in self.infos])
        self._files = _ShardFiles()

    def _locate(self, i: int) -> tuple[ShardInfo, int]:
        i = self._index(i)
        s = int(self._shard[i])
        return self.infos[s], i - int(self._first[s])

    def __getitem__(self, i: int) -> torch.Tensor:
        info, j = self._locate(i)
        data = self._files.read(info.path, int(info.offsets[j]), int(info.sizes[j]))
        return _decode_tokens(data, info.path, j, int(info.lengths[j]))

    def doc_id(self, i: int) -> str:
        """The document's id as written: its source file, JSONL id, or FILE:LINE."""
        info, j = self._locate(i)
        return self._files.read(info.path, int(info.id_offsets[j]), int(info.id_sizes[j])).decode("utf-8", "surrogateescape")


class ShardStream(IterableDataset):
    """Stream documents shard by shard, for ``StreamPacker`` or any collator; resumable.

    Each epoch the shard order is shuffled (``seed``, ``set_epoch``), then every rank takes every
    ``world_size``-th shard of that order and every DataLoader worker every ``num_workers``-th shard
    of its rank's (as webdataset's ``split_by_node`` and ``split_by_worker`` do). Yields 1-D int64
    token tensors, or ``{"input_ids", "id"}`` dicts with ``with_ids=True``.

    **Resume.** ``state_dict()`` is this process's (or worker's) place in its stream: the epoch, the
    seed, a fingerprint of the shard set, the rank, world size, worker and worker count, and
    ``position``, how many documents of its share it has yielded. ``load_state_dict`` makes the next
    iteration start there. torchdata's ``StatefulDataLoader`` saves and restores these per worker.
    A state from another shard set, seed, world size, rank, worker count or worker is refused with a
    ``ValueError``; it is never silently restarted. Positions count the documents in each shard's
    length index, so a shard skipped as corrupt still occupies its place.

    ``documents(positions)`` reads documents of the share by position, so ``StreamPacker`` can
    restore a buffer it saved as positions, not tokens.
    """

    def __init__(self, shards: str | Path | list[str], *, shuffle: bool = True, seed: int = 0,
                 skip_corrupt: bool = False, with_ids: bool = False) -> None:
        self.paths = expand_shards(shards)
        self.shuffle, self.seed, self.skip_corrupt, self.with_ids = shuffle, seed, skip_corrupt, with_ids
        self.epoch = 0
        self.position = 0  # documents of this share yielded in this epoch
        self._resume: dict[str, Any] | None = None
        self._placed: tuple[int, dict[str, int]] | None = None  # (pid, place), see place
        self._files = _ShardFiles()
        self._counts: dict[str, int] = {}
        # The shard set: names and sizes of every tar and length index, so a state from other data
        # is refused without reading the shards.
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}:{_index_size(path)};".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def place(self) -> dict[str, int]:
        """``{"rank", "world_size", "worker", "num_workers"}`` of this process: its rank and DataLoader
        worker. Fixed for a process, so kept after the first call in a worker or a rank, since
        state_dict() asks after every batch."""
        if self._placed is not None and self._placed[0] == os.getpid():
            return dict(self._placed[1])
        from packing.distributed import rank, world_size

        info = torch.utils.data.get_worker_info()
        place = {"rank": rank(), "world_size": world_size(), "worker": 0 if info is None else info.id,
                 "num_workers": 1 if info is None else info.num_workers}
        if info is not None or rank() or world_size() > 1:  # a worker or a rank: its place cannot change
            self._placed = (os.getpid(), place)
        return dict(place)

    def share(self, rank: int | None = None, worker: int | None = None, world_size: int | None = None,
              num_workers: int | None = None) -> list[str]:
        """A rank's and worker's shards for the current epoch, in stream order; by default this
        process's own."""
        place = self.place()
        rank, worker = place["rank"] if rank is None else rank, place["worker"] if worker is None else worker
        world_size = place["world_size"] if world_size is None else world_size
        num_workers = place["num_workers"] if num_workers is None else num_workers
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths)) if self.shuffle else range(len(self.paths))
        return [self.paths[i] for i in list(order)[rank::world_size][worker::num_workers]]

    def share_lengths(self, rank: int, worker: int, world_size: int, num_workers: int) -> np.ndarray:
        """(docs,) token counts of a share's documents in stream order, from the length indexes alone
        (no tar is read): what StreamPacker needs to count every rank's packs in advance."""
        if self.skip_corrupt:
            raise ValueError(
                "skip_corrupt=True with several ranks: a shard skipped while reading would change one rank's pack "
                "count after the ranks agreed on it, and DDP would hang; repair or remove the corrupt shards instead"
            )
        arrays = []
        for path in self.share(rank, worker, world_size, num_workers):
            try:
                arrays.append(np.load(_index_path(path), allow_pickle=False))
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f"shard {path}: its length index is unreadable ({e})") from None
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle, "fingerprint": self.fingerprint,
                "position": self.position, **self.place()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position on the next iteration; see the class docstring."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"ShardStream state has unknown keys {sorted(unknown)}; it is not a ShardStream state")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"ShardStream state is from another shard set (fingerprint {state.get('fingerprint')!r}, these "
                f"{len(self.paths)} shards give {self.fingerprint!r}); resume with the shards it was saved with"
            )
        for key in ("seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"ShardStream state has {key}={state[key]!r}, this stream {key}={getattr(self, key)!r}; "
                                 f"construct the stream with {key}={state[key]!r} to resume it")
        place = self.place()
        for key in ("world_size", "rank", "num_workers", "worker"):
            if state[key] != place[key]:
                raise ValueError(
                    f"ShardStream state was saved with {key}={state[key]}, this process has {key}={place[key]}; "
                    f"positions belong to one share of the shards: resume with the same world size and DataLoader workers"
                )
        self.epoch, self.position = state["epoch"], state["position"]
        self._resume = state

    def _count(self, path: str) -> int:
        """Documents in a shard's length index (0 if it is unreadable): its width in positions."""
        if path not in self._counts:
            try:
                self._counts[path] = len(np.load(_index_path(path), allow_pickle=False))
            except (ValueError, OSError, EOFError):
                self._counts[path] = 0
        return self._counts[path]

    def _sample(self, info: ShardInfo, j: int) -> Any:
        data = self._files.read(info.path, int(info.offsets[j]), int(info.sizes[j]))
        tokens = _decode_tokens(data, info.path, j, int(info.lengths[j]))
        if not self.with_ids:
            return tokens
        raw = self._files.read(info.path, int(info.id_offsets[j]), int(info.id_sizes[j]))
        return {"input_ids": tokens, "id": raw.decode("utf-8", "surrogateescape")}

    def documents(self, positions: list[int]) -> list[Any]:
        """The documents at these positions of this share (this epoch), in the order given."""
        starts, paths, first = [], [], 0
        for path in self.share():
            if self._count(path):  # a shard without documents owns no position
                starts.append(first)
                paths.append(path)
                first += self._count(path)
        out, infos = [], {}
        for p in positions:
            if not 0 <= p < first:
                raise ValueError(f"position {p} is past this share's {first} documents")
            k = bisect_right(starts, p) - 1
            path, start = paths[k], starts[k]
            if path not in infos:
                infos[path] = _scan_all([path], False)[0][0]
            out.append(self._sample(infos[path], p - start))
        return out

    def __iter__(self) -> Iterator[Any]:
        skip = self.position if self._resume is not None else 0
        self._resume, self.position = None, skip
        for path in self.share():
            # The width (its length index's count) is read only to skip; a valid shard's scan has it.
            if skip and skip >= self._count(path):  # taken before the saved state
                skip -= self._count(path)
                continue
            infos, _ = _scan_all([path], self.skip_corrupt)  # validated before its first document
            if not infos:  # skipped as corrupt: its positions pass without documents
                self.position += self._count(path) - skip
                skip = 0
                continue
            for j in range(skip, len(infos[0].lengths)):
                sample = self._sample(infos[0], j)
                self.position += 1  # before the yield: a saved state counts this document as taken
                yield sample
            skip = 0
