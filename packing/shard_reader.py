"""Read the shards that ``python -m packing.shards`` writes: map-style with lengths, or streamed.

Both readers check each shard against the length index beside it before yielding anything from it:
the member count, that every member's bytes lie inside the file, and, as each document is read,
that its token count matches. A truncated or corrupt shard raises ``ValueError`` naming the shard;
with ``skip_corrupt=True`` it is skipped instead, listed in ``skipped`` and warned about. (A plain
``webdataset.WebDataset`` reads a truncated tar up to the cut and stops without a word: checked with
webdataset 1.0.2, a shard cut mid-archive yielded 1 of its 3 documents.) Only ``tokens.npy`` and
``id.txt`` members are decoded, with ``np.load(..., allow_pickle=False)``; nothing is unpickled.

Example:
    >>> import tempfile, numpy as np
    >>> from packing.shards import ShardWriter
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
import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import Dataset, IterableDataset

from packing.shards import DOC_ID, TOKENS


def expand_shards(spec: str | Path | list[str]) -> list[str]:
    """Shard paths from a list, a directory (its index.json), braces ``shard-{000000..000009}.tar``,
    or a glob ``shards/*.tar``. A path that does not exist is an error, not an empty list."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        index = Path(spec) / "index.json"
        if not index.is_file():
            raise ValueError(f"{spec!r} has no index.json; write shards with python -m packing.shards")
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


def scan_shard(path: str) -> ShardInfo:
    """Read a shard's tar headers and its length index, and check that they agree."""
    sidecar = path[: -len(".tar")] + ".lengths.npy" if path.endswith(".tar") else path + ".lengths.npy"
    if not os.path.isfile(sidecar):
        raise ValueError(f"shard {path} has no length index {os.path.basename(sidecar)} beside it; "
                         "write shards with python -m packing.shards")
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


class ShardDataset(Dataset):
    """Map-style access to every document of some shards, with their lengths for the samplers.

    ``ds[i]`` is document ``i``'s token ids, a 1-D int64 tensor (collators derive the targets).
    ``ds.lengths`` comes from the length indexes, without reading any tokens.

    Args:
        shards: a directory written by ``python -m packing.shards``, a brace or glob pattern, or a list.
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

    @property
    def lengths(self) -> np.ndarray:
        """(num_docs,) int64 token counts, from the length indexes."""
        return self._lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def _locate(self, i: int) -> tuple[ShardInfo, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
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
    """Stream documents shard by shard, for ``StreamPacker`` or any collator.

    Each epoch the shard order is shuffled (``seed``, ``set_epoch``), then webdataset's
    ``split_by_node`` and ``split_by_worker`` give every rank and DataLoader worker its own shards.
    Yields 1-D int64 token tensors, or ``{"input_ids", "id"}`` dicts with ``with_ids=True``.
    """

    def __init__(self, shards: str | Path | list[str], *, shuffle: bool = True, seed: int = 0,
                 skip_corrupt: bool = False, with_ids: bool = False) -> None:
        self.paths = expand_shards(shards)
        self.shuffle, self.seed, self.skip_corrupt, self.with_ids = shuffle, seed, skip_corrupt, with_ids
        self.epoch = 0
        self._files = _ShardFiles()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _urls(self) -> Iterator[str]:
        import webdataset as wds

        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths)) if self.shuffle else range(len(self.paths))
        urls = ({"url": self.paths[i]} for i in order)
        for item in wds.split_by_worker(wds.split_by_node(urls)):
            yield item["url"]

    def __iter__(self) -> Iterator[Any]:
        for path in self._urls():
            infos, _ = _scan_all([path], self.skip_corrupt)  # validated before its first document
            for info in infos:
                for j in range(len(info.lengths)):
                    data = self._files.read(info.path, int(info.offsets[j]), int(info.sizes[j]))
                    tokens = _decode_tokens(data, info.path, j, int(info.lengths[j]))
                    if self.with_ids:
                        raw = self._files.read(info.path, int(info.id_offsets[j]), int(info.id_sizes[j]))
                        yield {"input_ids": tokens, "id": raw.decode("utf-8", "surrogateescape")}
                    else:
                        yield tokens
