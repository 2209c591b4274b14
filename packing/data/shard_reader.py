"""Read the shards that ``python -m packing.data.shards`` writes: map-style with lengths, or streamed.

Both readers check each shard against the length index beside it before yielding anything from it:
the member count, that every member's bytes lie inside the file, and that each ``tokens.npy``
member's size is what its length in the index gives (so an index that disagrees with its tar is
caught before any document is read). A truncated or corrupt shard raises ``ValueError`` naming the
shard; with ``skip_corrupt=True`` it is skipped instead, listed in ``skipped`` and warned about.
(A plain ``webdataset.WebDataset`` reads a truncated tar up to the cut and stops without a word:
checked with webdataset 1.0.2, a shard cut mid-archive yielded 1 of its 3 documents.)

The set comes first: a shard is read only as one of the shards its directory's ``index.json``
lists (:mod:`packing.data.manifest`), after its sidecars match their SHA-256s there, its tar its
size, and its keys its place in the set. A glob or list naming a shard the index does not list, or
shards of two sets, is refused.

Each document is then checked as it is read: its bytes against the CRC-32 the writer recorded, its
token count against the index, its ids against ``vocab_size`` in ``index.json``, and its id against
its own CRC-32. A flipped byte raises ``ValueError`` naming the shard, the document's key, and the
expected and found values. ``ShardStream(skip_corrupt=True)`` skips such a document instead and
counts it in ``skipped_docs``; ``ShardDataset`` always raises, since a sampler has already planned
its batches around it. Sets of formats 1 and 2 still read, with one warning per directory naming
what goes unchecked. Only ``tokens.npy`` and ``id.txt`` members are decoded, with
``np.load(..., allow_pickle=False)`` or ``np.frombuffer`` after matching the exact header ``np.save``
writes; nothing is unpickled.

Examples:
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

import atexit
import glob
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import warnings
import zlib
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset

from packing.data.indexed import LengthIndexed
from packing.data.split import ChunkPlan, check_policy, chunk_sample, plan_chunks
from packing.sample import Sample
from packing.data.manifest import DOC_ID, TOKENS, Manifest, load as load_manifest, of_shard, read_index, sidecar  # noqa: F401

NPY_HEADER = 128  # bytes before the data in every tokens.npy np.save writes for a 1-D uint16/uint32 array


def expand_shards(spec: str | Path | list[str]) -> list[str]:
    """Shard paths of one set: its directory (every shard its index.json lists, in order), or shards
    named by a list, braces ``shard-{000000..000009}.tar`` or a glob ``shards/*.tar``.

    Each named shard must be listed in the index.json beside it, all of one set, each once: a stale
    shard (left by a killed write), another set's, or a path that does not exist is a ValueError
    naming it, never an empty or mixed list."""
    if isinstance(spec, (str, Path)) and os.path.isdir(spec):
        return load_manifest(spec).paths
    paths = _named(spec)
    sets: dict[str, str] = {}
    for path in paths:
        manifest = of_shard(path)
        manifest.entry(path)  # listed: not stale, not foreign
        sets.setdefault(manifest.directory, path)
    if len(sets) > 1:
        (a, first), (b, second) = list(sets.items())[:2]
        raise ValueError(f"the shards named come from {len(sets)} sets ({first} in {a}, {second} in {b}); a reader "
                         "reads one set: name its directory, or shards of one set")
    seen: set[str] = set()
    for path in paths:
        if os.path.abspath(path) in seen:
            raise ValueError(f"shard {path} is named twice; each shard is read once")
        seen.add(os.path.abspath(path))
    return paths


def _named(spec: str | Path | list[str]) -> list[str]:
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _named(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        raise ValueError(f"{spec!r} is a directory inside a list; pass a set's directory on its own")
    paths: list[str] = []
    for pattern in braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise ValueError(f"no shard at {pattern!r}; check the path (braces and globs are expanded)")
        paths += matches
    return paths


def _regular(path: str, what: str) -> os.stat_result:
    """``path``'s stat, refusing what is not a regular file inside its own directory: a FIFO or a
    device (reading would hang or never end), a symlink out of the directory (another set's data;
    one to a file under the directory, at any depth, is followed),
    or a path the OS cannot open (gone, a loop): each a ValueError naming the shard."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"shard {path}: its {what} cannot be opened ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"shard {path}: its {what} is not a regular file (mode {stat.filemode(st.st_mode)}); "
                         "shards are plain files")
    if os.path.islink(path):
        home = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if os.path.commonpath([os.path.realpath(path), home]) != home:  # under its directory, at any depth
            raise ValueError(f"shard {path}: its {what} is a symlink out of its directory, to "
                             f"{os.path.realpath(path)}; a set reads only its own files")
    return st


@dataclass(frozen=True)
class ShardInfo:
    """Where each document of one shard lies: (docs,) arrays of lengths, byte offsets and sizes, its
    tar key, and what to check it against: (docs,) uint32 CRC-32s of its tokens and of its id
    (None: an older format without them) and the set's vocabulary size."""

    path: str
    lengths: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    id_offsets: np.ndarray
    id_sizes: np.ndarray
    keys: tuple[str, ...] = ()
    crc32: np.ndarray | None = None
    vocab_size: int | None = None
    idcrc32: np.ndarray | None = None


WHAT = {"lengths": "length index", "crc32": "checksum file", "idcrc32": "id checksum file"}


def _sidecar(path: str, kind: str, manifest: Manifest, entry: dict[str, Any]) -> np.ndarray | None:
    """The array in a shard's ``kind`` sidecar, read once and checked against the SHA-256 its entry
    records (format 3); None when an older format has no such file."""
    file = sidecar(path, kind)
    what = f"{WHAT[kind]} {os.path.basename(file)}"
    required = manifest.version >= 3 or kind == "lengths" or (kind == "crc32" and manifest.version >= 2)
    if not os.path.lexists(file):
        if not required:
            return None
        raise ValueError(f"shard {path} has no {what} beside it, though its index.json says "
                         f"{manifest.meta.get('format')}; write shards with python -m packing.data.shards")
    _regular(file, what)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"shard {path}: its {what} cannot be read ({e.strerror or e})") from None
    if manifest.version >= 3:
        found, recorded = hashlib.sha256(data).hexdigest(), entry["sha256"][kind]
        if found != recorded:
            raise ValueError(f"shard {path}: its {what} does not match {manifest.index} (SHA-256 {found[:12]}, the "
                             f"index records {recorded[:12]}): it was replaced or changed after the set was written "
                             "(a stale or foreign file); restore it, or rewrite the set")
    for descr in ("<i8", "<u4"):  # the header np.save writes for a sidecar: skip np.load's header parse
        count = (len(data) - NPY_HEADER) // np.dtype(descr).itemsize
        if data[:NPY_HEADER] == _npy_header(descr, count) and len(data) == NPY_HEADER + count * np.dtype(descr).itemsize:
            return np.frombuffer(data, dtype=descr, offset=NPY_HEADER)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"shard {path}: its {what} is unreadable ({e})") from None


def read_lengths(path: str) -> np.ndarray:
    """A shard's (docs,) int64 token counts from its length index, checked against its set's entry:
    the file's hash (format 3), positive ints, the entry's document and token counts."""
    manifest = of_shard(path)
    entry = manifest.entry(path)
    lengths = _sidecar(path, "lengths", manifest, entry)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or (len(lengths) and lengths.min() < 1):
        raise ValueError(f"shard {path}: its length index is not a 1-D array of positive ints")
    lengths = lengths.astype(np.int64)
    for key, found in (("docs", len(lengths)), ("tokens", int(lengths.sum()))):
        if key in entry and found != entry[key]:
            raise ValueError(f"shard {path}: its length index gives {found:,} {key}, {manifest.index} records "
                             f"{entry[key]:,}; the shard or the index changed after the set was written")
    return lengths


def _checksums(path: str, kind: str, manifest: Manifest, entry: dict[str, Any], docs: int) -> np.ndarray | None:
    """A shard's (docs,) CRC-32s of its tokens (``crc32``) or ids (``idcrc32``); None in an older format."""
    crc = _sidecar(path, kind, manifest, entry)
    if crc is not None and (crc.shape != (docs,) or crc.dtype != np.uint32):
        raise ValueError(f"shard {path}: its {WHAT[kind]} holds {crc.dtype} {crc.shape}, expected uint32 ({docs},)")
    return crc


def scan_shard(path: str, lengths: np.ndarray | None = None) -> ShardInfo:
    """Read a shard's tar headers and its sidecars, and check them against each other and against
    the shard's entry in its set's index.json. ``lengths``: its length index as
    :func:`read_lengths` returned it already (a stream has it from planning), not read again."""
    manifest = of_shard(path)
    entry = manifest.entry(path)
    size = _regular(path, "tar").st_size
    if manifest.version >= 3 and size != entry["bytes"]:
        change = "is truncated" if size < entry["bytes"] else "was replaced or changed after the set was written"
        raise ValueError(f"shard {path} {change}: its tar has {size:,} bytes, {manifest.index} records "
                         f"{entry['bytes']:,}; restore it, or rewrite the set")
    lengths = read_lengths(path) if lengths is None else lengths
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
    keys = list(tokens)  # tar order, the order written and indexed (string order breaks past 10^9 keys)
    if len(keys) != len(lengths) or sorted(ids) != sorted(keys):
        raise ValueError(f"shard {path} is corrupt or truncated: {len(keys)} token arrays and {len(ids)} ids "
                         f"for {len(lengths)} documents in its length index")
    if manifest.version >= 3:  # a key is the document's set position: a shard moved from elsewhere shows
        expected = [f"{entry['first'] + j:09d}" for j in range(len(keys))]
        if keys != expected:
            bad = next(j for j in range(len(keys)) if keys[j] != expected[j])
            raise ValueError(f"shard {path}: its document {bad} has key {keys[bad]}, but its place in the set gives "
                             f"{expected[bad]}; the shard came from another position or set")
    offsets, sizes = (np.array([tokens[k][i] for k in keys], dtype=np.int64) for i in (0, 1))
    id_offsets, id_sizes = (np.array([ids[k][i] for k in keys], dtype=np.int64) for i in (0, 1))
    if len(keys) and max((offsets + sizes).max(), (id_offsets + id_sizes).max()) > size:
        raise ValueError(f"shard {path} is truncated: members extend past its {size} bytes")
    meta = manifest.meta
    # Each member is the 128-byte .npy header and length x itemsize bytes: an index that disagrees
    # with its tar shows here, before any document is read.
    itemsizes = [np.dtype(meta["dtype"]).itemsize] if meta.get("dtype") in ("uint16", "uint32") else [2, 4]
    if len(keys) and not any(np.array_equal(sizes, NPY_HEADER + lengths * b) for b in itemsizes):
        bad = next(i for i in range(len(keys)) if all(sizes[i] != NPY_HEADER + lengths[i] * b for b in itemsizes))
        raise ValueError(f"shard {path}: its length index disagrees with its tar: document {keys[bad]} is listed "
                         f"with {lengths[bad]} tokens but its tokens.npy member has {sizes[bad]} bytes")
    return ShardInfo(path, lengths, offsets, sizes, id_offsets, id_sizes, tuple(keys),
                     _checksums(path, "crc32", manifest, entry, len(keys)), meta.get("vocab_size"),
                     _checksums(path, "idcrc32", manifest, entry, len(keys)))


def _scan_all(paths: list[str], skip_corrupt: bool,
              lengths: np.ndarray | None = None) -> tuple[list[ShardInfo], list[tuple[str, str]]]:
    infos, skipped = [], []
    for path in paths:
        try:
            infos.append(scan_shard(path, lengths))
        except ValueError as e:
            if not skip_corrupt:
                raise ValueError(f"{e}; pass skip_corrupt=True to skip such shards and report them") from None
            skipped.append((path, str(e)))
            warnings.warn(f"skipping {e}", stacklevel=3)
    return infos, skipped


class _ShardFiles:
    """Reads byte ranges of shards through at most ``MAX_OPEN`` file descriptors per process, shared
    by every reader in it: four readers over 2,000 shards still hold at most 64.

    Descriptors are kept in least-recently-used order and the oldest is closed when one more is
    needed, so any number of shards, and of readers, reads under a small ``ulimit -n`` (1,000 shards
    under 256 in ``tests/packing/test_shards.py``). ``os.pread`` reads without moving a shared
    offset, and a raw descriptor is closed here, not left to the garbage collector (no
    unclosed-file warning). Fork- and spawn-safe: a DataLoader worker finds another pid, drops its
    inherited copies, and opens its own; descriptors never travel in a pickle (each reader holds a
    handle to the process's table, not the table).
    """

    MAX_OPEN = 64
    _pid: int | None = None
    _fds: OrderedDict[str, int] = OrderedDict()  # the process's one table, shared by every reader
    _vetted: set[str] = set()  # paths whose target _regular has checked (a reopen needs only fstat)

    @classmethod
    def _fd(cls, path: str) -> int:
        if cls._pid != os.getpid():  # a new process: the descriptors it inherited are its own copies
            cls.close()
            cls._pid = os.getpid()
        fd = cls._fds.get(path)
        if fd is not None:
            cls._fds.move_to_end(path)
            return fd
        if len(cls._fds) >= cls.MAX_OPEN:
            os.close(cls._fds.popitem(last=False)[1])
        if path not in cls._vetted:  # where it leads, once: a symlink out of its directory is refused
            _regular(path, "tar")
            cls._vetted.add(path)
        try:
            # O_NONBLOCK: a FIFO put in the shard's place since it was vetted opens at once (instead
            # of waiting for a writer forever), and its pread then fails (no seek on a pipe). No
            # fstat here: a reopen costs what it did before the checks (one open, one pread).
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ValueError(f"shard {path}: its tar cannot be opened ({e.strerror or e})") from None
        cls._fds[path] = fd
        return fd

    def read(self, path: str, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd(path), size, offset)
        except OSError as e:  # not a regular file any more (a pipe cannot seek), or an I/O error
            raise ValueError(f"shard {path} cannot be read at byte {offset:,} ({e.strerror or e}); check the "
                             "file, or pass skip_corrupt=True (streaming) to skip such shards") from None
        if len(data) != size:
            raise ValueError(f"shard {path} is truncated: wanted {size} bytes at {offset}, got {len(data)}")
        return data

    @classmethod
    def close(cls) -> None:
        """Close the process's descriptors (a forked worker's inherited copies, or at exit)."""
        while cls._fds:
            try:
                os.close(cls._fds.popitem()[1])
            except OSError:
                pass


atexit.register(_ShardFiles.close)


def _npy_header(descr: str, length: int) -> bytes:
    """The 128-byte header ``np.save`` (format 1.0) writes for a 1-D array of ``length`` ``descr``s."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (descr, length)
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"  # padded so data starts 64-byte aligned
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


class CorruptDocument(ValueError):
    """One document's bytes fail a check (checksum, decoding, length or vocabulary); its shard is
    otherwise sound, so a stream with ``skip_corrupt=True`` can skip just this document."""


def _decode_tokens(data: bytes, info: ShardInfo, j: int) -> torch.Tensor:
    """Document ``j`` of ``info``'s shard from its member bytes, checked; (length,) int64."""
    name = f"document {info.keys[j]} (position {j})" if info.keys else f"document {j}"
    if info.crc32 is not None:
        found = zlib.crc32(data)
        if found != int(info.crc32[j]):
            raise CorruptDocument(f"shard {info.path}: {name} is corrupt: its bytes have CRC-32 {found:08x}, "
                                  f"the writer recorded {int(info.crc32[j]):08x}")
    length = int(info.lengths[j])
    dtype = np.uint16 if data[22:24] == b"u2" else np.uint32  # the descr's bytes, e.g. '<u2'
    if data[:NPY_HEADER] == _npy_header(np.dtype(dtype).str, length):
        # The header np.save writes for exactly this array: read the ids without parsing it (np.load
        # parses the header with ast.literal_eval, the largest cost of a read).
        arr = np.frombuffer(data, dtype=dtype, offset=NPY_HEADER)
    else:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptDocument(f"shard {info.path}: {name} is not a readable .npy ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or len(arr) != length:
        raise CorruptDocument(f"shard {info.path}: {name} holds {arr.dtype} {arr.shape}, "
                              f"but the length index says {length} tokens")
    if info.vocab_size is not None and length and int(arr.max()) >= info.vocab_size:
        at = int(arr.argmax())
        raise CorruptDocument(f"shard {info.path}: {name} has token id {int(arr[at])} at token {at}, at or above "
                              f"the vocabulary size {info.vocab_size} in its index.json")
    return torch.from_numpy(arr.astype(np.int64))


def _decode_id(data: bytes, info: ShardInfo, j: int) -> str:
    """Document ``j``'s id from its ``id.txt`` member bytes, checked against its CRC-32 (format 3)."""
    if info.idcrc32 is not None and zlib.crc32(data) != int(info.idcrc32[j]):
        raise CorruptDocument(f"shard {info.path}: the id of document {info.keys[j]} (position {j}) is corrupt: its "
                              f"bytes have CRC-32 {zlib.crc32(data):08x}, the writer recorded {int(info.idcrc32[j]):08x}")
    return data.decode("utf-8", "surrogateescape")


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
            what = "every shard was skipped as corrupt" if self.skipped else "the set holds no documents"
            spec = str(shards) if isinstance(shards, (str, Path)) else f"{len(shards)} shards named"
            raise ValueError(f"no readable shard in {spec}: {what}")
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
        return _decode_tokens(data, info, j)

    def doc_id(self, i: int) -> str:
        """The document's id as written: its source file, JSONL id, or FILE:LINE."""
        info, j = self._locate(i)
        return _decode_id(self._files.read(info.path, int(info.id_offsets[j]), int(info.id_sizes[j])), info, j)


class _SharedEpochs:
    """Slots of ``[epoch, set by set_epoch]`` int64 pairs in shared memory, ``BLOCK`` to a block: a
    shared tensor holds a file descriptor, so a process holds one per block, not one per stream.
    A forked process takes its slots from a block of its own (its parent's is shared with it)."""

    BLOCK = 1024
    _block: torch.Tensor | None = None
    _used = 0
    _pid: int | None = None

    @classmethod
    def slot(cls) -> torch.Tensor:
        if cls._block is None or cls._used == cls.BLOCK or cls._pid != os.getpid():
            cls._block, cls._used, cls._pid = torch.zeros(cls.BLOCK, 2, dtype=torch.int64).share_memory_(), 0, os.getpid()
        cls._used += 1
        return cls._block[cls._used - 1]


class ShardStream(IterableDataset):
    """Stream documents shard by shard, for ``StreamPacker`` or any collator; resumable.

    Each epoch the shard order is shuffled (``seed``, ``set_epoch``), then every rank takes every
    ``world_size``-th shard of that order and every DataLoader worker every ``num_workers``-th shard
    of its rank's (as webdataset's ``split_by_node`` and ``split_by_worker`` do). Yields 1-D int64
    token tensors, or ``{"input_ids", "id"}`` dicts with ``with_ids=True``.

    **Long documents.** ``max_len=N, too_long="error" | "split" | "truncate"`` is the policy of
    :mod:`packing.data.split`: a document over ``N`` tokens is refused naming it (the default once
    ``max_len`` is given), cut into chunks of ``N`` (each a :class:`~packing.sample.Sample` that keeps
    the document's next-token targets; with ids, ``"targets"`` too and an id ending ``[start:end]``), or
    truncated to its first ``N``. Chunks are planned from the length indexes, so each has its own
    position and a resume is exact; ``too_long_summary()`` counts what was split or truncated, and
    the tokens dropped, over the whole set. Give ``StreamPacker(max_tokens=M)`` a stream with
    ``max_len <= M``.

    **Resume.** ``state_dict()`` is this process's (or worker's) place in its stream: the epoch, the
    seed, a fingerprint of the shard set (its sealed manifest's checksum and the shards read), the
    rank, world size, worker and worker count, and ``position``, how many documents (chunks) of its
    share it has yielded. ``load_state_dict`` makes the next iteration start there. torchdata's
    ``StatefulDataLoader`` saves and restores these per worker. A state from another shard set,
    seed, ``max_len``/``too_long``, world size, rank, worker count or worker is refused with a
    ``ValueError``; it is never silently restarted. Its position must lie within its share, and the
    documents before it are counted from length indexes checked against the manifest, so a shard
    swapped or edited since the save is refused, not skipped over. Positions count the documents in
    each shard's length index, so a shard or document skipped as corrupt still occupies its place.

    **Epochs.** ``set_epoch`` reaches DataLoader workers, persistent ones too (the epoch lives in
    shared memory). A loaded state resumes the epoch it was saved in: ``set_epoch`` of that epoch
    keeps it; of another, a state saved at its epoch's end is done (the new epoch starts from its
    beginning), and a state saved mid-epoch is refused, whichever of the two calls comes first.

    ``skipped`` and ``skipped_docs`` list what this process skipped with ``skip_corrupt=True``: each
    DataLoader worker keeps its own lists (and warns for each), so read them with ``num_workers=0``,
    or from the warnings.

    ``documents(positions)`` reads documents of the share by position, so ``StreamPacker`` can
    restore a buffer it saved as positions, not tokens.
    """

    def __init__(self, shards: str | Path | list[str], *, shuffle: bool = True, seed: int = 0,
                 skip_corrupt: bool = False, with_ids: bool = False, max_len: int | None = None,
                 too_long: str = "error") -> None:
        check_policy(max_len, too_long)
        self.paths = expand_shards(shards)
        self.shuffle, self.seed, self.skip_corrupt, self.with_ids = shuffle, seed, skip_corrupt, with_ids
        self.max_len, self.too_long = max_len, too_long
        # [epoch, set by set_epoch] in shared memory: DataLoader workers (persistent ones too, which
        # keep their copy of the stream across epochs) read the epoch the main process sets.
        self._epoch = _SharedEpochs.slot()
        self.position = 0  # documents of this share yielded in this epoch
        self._resume: dict[str, Any] | None = None
        self._placed: tuple[int, dict[str, int]] | None = None  # (pid, place), see place
        self._files = _ShardFiles()
        self._plans: dict[str, ChunkPlan] = {}
        self._lengths: dict[str, np.ndarray] = {}  # shard -> its checked length index, as planned
        self._unreadable: dict[str, str] = {}  # shard -> why its length index could not be read
        self._last: tuple[str, int, Any] | None = None  # (shard, doc, tokens or the error): a split document is read once
        self.skipped: list[tuple[str, str]] = []  # (shard, why): shards skipped as corrupt, this process
        self.skipped_docs: list[tuple[str, str, str]] = []  # (shard, key, why): documents skipped as corrupt
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """The shard set's identity: its sealed index's checksum and the shards read, in order (format
        3); names and sizes for older formats. A state from other data is refused by it."""
        digest = hashlib.sha256()
        for path in self.paths:
            manifest = of_shard(path)
            if manifest.version >= 3:
                digest.update(f"{manifest.meta['checksum']}:{os.path.basename(path)};".encode())
            else:
                size = os.path.getsize(sidecar(path, "lengths")) if os.path.isfile(sidecar(path, "lengths")) else -1
                digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}:{size};".encode())
        return digest.hexdigest()[:16]

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the shards for ``epoch`` from the next iteration on, in this process and in its
        DataLoader workers, persistent ones included.

        A loaded state resumes the epoch it was saved in. ``set_epoch`` of that epoch keeps it. Of
        another epoch, a state saved at its epoch's end is done and the new epoch starts from its
        beginning; a state saved mid-epoch is refused, since the new epoch's order would be read
        from the old epoch's position (documents lost or repeated)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch is {epoch!r}; expected an int >= 0")
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._settle(self._resume, epoch)
        self._epoch[0], self._epoch[1] = epoch, 1

    def _settle(self, state: dict[str, Any], epoch: int) -> None:
        """A state of ``state["epoch"]`` meets epoch ``epoch``: done at its end, refused mid-way."""
        total = self._share_size(state["epoch"])
        if state["position"] < total:
            raise ValueError(
                f"set_epoch({epoch}) with a ShardStream state saved mid-way through epoch {state['epoch']} (at "
                f"{state['position']:,} of this share's {total:,} documents): the state resumes epoch "
                f"{state['epoch']}; call set_epoch({state['epoch']}) to finish it, or do not load the state to start "
                f"epoch {epoch} from its beginning"
            )
        self._resume, self.position = None, 0  # the saved epoch was finished: the next starts afresh

    def _share_size(self, epoch: int) -> int:
        """Positions (documents, or chunks with ``max_len``) in this process's share of ``epoch``."""
        # The epoch is passed, never set for the call: the slot is shared with the other workers, and
        # a worker that set it for a moment made another read the saved epoch as the one set_epoch
        # asked for, and resume the old epoch instead of refusing (a race between two workers).
        paths = self.share(epoch=epoch)
        for path in paths:
            self._count(path)
            if path in self._unreadable:
                raise ValueError(f"cannot place a resume exactly: shard {path}'s length index fails its check "
                                 f"({self._unreadable[path]}); restore the shard, or start the epoch afresh")
        return sum(self._count(path) for path in paths)

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
              num_workers: int | None = None, epoch: int | None = None) -> list[str]:
        """A rank's and worker's shards for ``epoch`` (default: the current one), in stream order; by
        default this process's own."""
        place = self.place()
        rank, worker = place["rank"] if rank is None else rank, place["worker"] if worker is None else worker
        world_size = place["world_size"] if world_size is None else world_size
        num_workers = place["num_workers"] if num_workers is None else num_workers
        epoch = self.epoch if epoch is None else epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths)) if self.shuffle else range(len(self.paths))
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
            plan = self._plan(path)
            if path in self._unreadable:
                raise ValueError(f"shard {path}: its length index is unreadable ({self._unreadable[path]})")
            arrays.append(plan.length)
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    def too_long_summary(self) -> dict[str, int]:
        """What ``max_len`` / ``too_long`` do to the whole shard set, from the length indexes alone:
        ``{"documents", "chunks", "split", "truncated", "dropped_tokens"}``."""
        plans = [self._plan(path) for path in self.paths]
        return {"documents": sum(int(len(np.unique(p.doc))) for p in plans), "chunks": sum(len(p.doc) for p in plans),
                "split": sum(p.split for p in plans), "truncated": sum(p.truncated for p in plans),
                "dropped_tokens": sum(p.dropped_tokens for p in plans)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle, "fingerprint": self.fingerprint,
                "max_len": self.max_len, "too_long": self.too_long, "position": self.position, **self.place()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position on the next iteration; see the class docstring."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"ShardStream state has unknown keys {sorted(unknown)}; it is not a ShardStream state")
        missing = {"epoch", "fingerprint", "position", "world_size", "rank", "num_workers", "worker"} - set(state)
        if missing:
            raise ValueError(f"ShardStream state lacks {sorted(missing)}; it is not a ShardStream state, or it is "
                             "truncated: resume from a whole saved state")
        epoch = state["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"ShardStream state has epoch {epoch!r}; expected an int >= 0")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"ShardStream state is from another shard set (fingerprint {state.get('fingerprint')!r}, these "
                f"{len(self.paths)} shards give {self.fingerprint!r}); resume with the shards it was saved with"
            )
        for key in ("seed", "shuffle", "max_len", "too_long"):
            saved = state.get(key, {"max_len": None, "too_long": "error"}.get(key))  # absent: saved before them
            if saved != getattr(self, key):
                raise ValueError(f"ShardStream state has {key}={saved!r}, this stream {key}={getattr(self, key)!r}; "
                                 f"construct the stream with {key}={saved!r} to resume it")
        place = self.place()
        for key in ("world_size", "rank", "num_workers", "worker"):
            if state[key] != place[key]:
                raise ValueError(
                    f"ShardStream state was saved with {key}={state[key]}, this process has {key}={place[key]}; "
                    f"positions belong to one share of the shards: resume with the same world size and DataLoader workers"
                )
        position = state["position"]
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"ShardStream state has position {position!r}; expected an int >= 0 (documents taken)")
        total = self._share_size(state["epoch"])
        if position > total:
            raise ValueError(f"ShardStream state has position {position:,}, but this share of epoch {state['epoch']} "
                             f"holds {total:,} documents; the state is corrupt or from other data")
        if self._epoch[1] and self.epoch != state["epoch"]:  # set_epoch came first: the same rule
            self._settle(state, self.epoch)
            return
        self._epoch[0] = state["epoch"]
        self.position, self._resume = position, state

    def _plan(self, path: str) -> ChunkPlan:
        """The chunks of a shard's documents under ``max_len`` / ``too_long``, from its checked length
        index alone (none if it fails its check): positions count chunks, so a resume stays exact."""
        if path not in self._plans:
            try:
                lengths = self._lengths[path] = read_lengths(path)
            except ValueError as e:
                self._unreadable[path] = str(e)  # share_lengths and a resume refuse it; a stream skips it as corrupt
                lengths = np.zeros(0, dtype=np.int64)
            self._plans[path] = plan_chunks(lengths, self.max_len, self.too_long,
                                            name=lambda i: f"document {i} of shard {path}")
        return self._plans[path]

    def _count(self, path: str) -> int:
        """Positions a shard occupies: its chunks (its documents, without ``max_len``)."""
        return len(self._plan(path).doc)

    def _sample(self, info: ShardInfo, j: int) -> Any:
        """Chunk ``j`` of the shard: its tokens (a whole document), or a :class:`Sample` with the
        document's own targets (a piece of one); a dict with its id with ``with_ids=True``."""
        if self.max_len is None and not self.with_ids:  # the usual case: chunk j is document j
            data = self._files.read(info.path, int(info.offsets[j]), int(info.sizes[j]))
            return _decode_tokens(data, info, j)
        plan = self._plan(info.path)
        d, start, length = int(plan.doc[j]), int(plan.start[j]), int(plan.length[j])
        if self._last is None or self._last[:2] != (info.path, d):
            try:
                data = self._files.read(info.path, int(info.offsets[d]), int(info.sizes[d]))
                self._last = (info.path, d, _decode_tokens(data, info, d))
            except CorruptDocument as e:
                self._last = (info.path, d, e)
        tokens = self._last[2]
        if isinstance(tokens, CorruptDocument):
            raise tokens
        sample = chunk_sample(tokens, start, length)
        if not self.with_ids:
            return sample
        doc_id = _decode_id(self._files.read(info.path, int(info.id_offsets[d]), int(info.id_sizes[d])), info, d)
        if isinstance(sample, Sample):
            return {"input_ids": sample.input_ids, "targets": sample.labels, "id": f"{doc_id}[{start}:{start + length}]"}
        return {"input_ids": sample, "id": doc_id}

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
            count = self._count(path)  # its checked length index's width, read only to skip
            if skip and path in self._unreadable:
                raise ValueError(f"cannot resume exactly: shard {path}'s length index fails its check "
                                 f"({self._unreadable[path]}), so the positions before the saved one are unknown; "
                                 "restore the shard, or start the epoch afresh")
            if skip and skip >= count:  # taken before the saved state
                skip -= count
                continue
            # Validated before its first document (its length index was checked when planned).
            infos, skipped = _scan_all([path], self.skip_corrupt, self._lengths.get(path))
            self.skipped += skipped
            if not infos:  # skipped as corrupt: its positions pass without documents
                self.position += self._count(path) - skip
                skip = 0
                continue
            for j in range(skip, self._count(path)):
                try:
                    sample = self._sample(infos[0], j)
                except CorruptDocument as e:
                    if not self.skip_corrupt:
                        raise ValueError(f"{e}; pass skip_corrupt=True to skip such documents and count them") from None
                    self.position += 1  # its position passes without a document, as a skipped shard's do
                    key = infos[0].keys[int(self._plan(path).doc[j])]
                    if not self.skipped_docs or self.skipped_docs[-1][:2] != (path, key):  # once per document, not per chunk
                        self.skipped_docs.append((path, key, str(e)))
                        warnings.warn(f"skipping {e}", stacklevel=2)
                    continue
                self.position += 1  # before the yield: a saved state counts this document as taken
                yield sample
            skip = 0
