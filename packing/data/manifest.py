"""A shard set's manifest, ``index.json``: what the set is, how it is sealed, and how readers check it.

A set is one unit: its directory's ``index.json`` lists every shard, and a reader reads only what
the index lists, as the index describes it. Format 3 (``varlen-packing-shards/3``) makes that
checkable. Besides the tokenizer, ``vocab_size`` and ``dtype``, it holds:

- ``shards``: for each shard, in set order, the bare names of its four files. Those are the tar,
  ``.lengths.npy`` (token counts), ``.crc32.npy`` (a CRC-32 per ``tokens.npy`` member) and
  ``.idcrc32.npy`` (a CRC-32 per ``id.txt`` member). Each entry also has the SHA-256 of each file
  (``sha256``), the tar's size in ``bytes``, its ``docs`` and its ``tokens``;
- ``docs`` and ``tokens``: the totals over the shards;
- ``set_id``: the SHA-256 of every shard's file hashes in order (32 hex digits). Two sets share it
  only when their shards are the same bytes;
- ``checksum``: the SHA-256 of the index itself (its canonical JSON, without this key).

A reader checks the checksum, the bare and unique names, the totals, and the vocabulary when it
loads the index. When it opens a shard, it checks the shard's sidecars against their hashes, the
tar's size, the counts, and that its keys are the set positions its entry gives. Each document's
tokens and id are checked against their CRC-32s as they are read. The tar's own SHA-256 is read
whole only by ``python -m packing.data.shards --verify DIR`` (and ``--upgrade``): its members are
covered piece by piece already.

Formats 1 and 2 still read. One warning per directory names what goes unchecked, and
``python -m packing.data.shards --upgrade DIR`` rewrites such a set's index in place as format 3.

Examples:
    >>> meta = seal({"format": FORMAT, "vocab_size": 259, "dtype": "uint16", "docs": 0, "tokens": 0, "shards": []})
    >>> meta["checksum"] == checksum(meta), len(meta["set_id"])
    (True, 32)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "varlen-packing-shards/3"  # 3: a sealed manifest (2: a CRC-32 per document; 1: none)
FORMATS = {"varlen-packing-shards/1": 1, "varlen-packing-shards/2": 2, FORMAT: 3}
KINDS = ("tar", "lengths", "crc32", "idcrc32")  # a shard's files, as its entry names them
TOKENS, DOC_ID = "tokens.npy", "id.txt"  # a document's two members in its shard's tar
SIDECARS = KINDS[1:]
UPGRADE = "python -m packing.data.shards --upgrade"


def sidecar(tar_path: str, kind: str) -> str:
    """The file beside a shard: ``kind`` "lengths", "crc32" or "idcrc32"
    (shard-000000.tar -> shard-000000.KIND.npy)."""
    stem = tar_path[: -len(".tar")] if tar_path.endswith(".tar") else tar_path
    return f"{stem}.{kind}.npy"


def checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of the index's canonical JSON (sorted keys, no spaces), without its ``checksum`` key."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def set_id(shards: list[dict[str, Any]]) -> str:
    """The set's identity: SHA-256 over every shard's file hashes, in set order (32 hex digits)."""
    digest = hashlib.sha256()
    for entry in shards:
        digest.update("".join(entry["sha256"][kind] for kind in KINDS).encode())
    return digest.hexdigest()[:32]


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """Set ``meta``'s ``set_id`` and ``checksum`` (last: it covers everything else); returns it."""
    meta["set_id"] = set_id(meta["shards"])
    meta["checksum"] = checksum(meta)
    return meta


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_index(index: str | Path) -> dict[str, Any]:
    """A set's ``index.json``, or a ValueError naming the file: unreadable, not JSON (a torn
    write), or not an index."""
    try:
        meta = json.loads(Path(index).read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{index} is unreadable ({e}); it describes the shards beside it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards", []), list):
        raise ValueError(f"{index} is not a shard index (a JSON object); write shards with python -m packing.data.shards")
    return meta


@dataclass(frozen=True)
class Manifest:
    """A set's checked ``index.json``: ``entries`` maps each shard's tar name to its entry, with
    ``first``, the set position of its first document, added. ``version`` is 1, 2 or 3."""

    directory: str
    index: str
    meta: dict[str, Any]
    version: int
    entries: dict[str, dict[str, Any]]

    @property
    def paths(self) -> list[str]:
        """Every shard's path, in set order."""
        return [os.path.join(self.directory, name) for name in self.entries]

    def entry(self, path: str) -> dict[str, Any]:
        """The entry of the shard at ``path``; a file the index does not list is refused."""
        name = os.path.basename(path)
        if name not in self.entries:
            raise ValueError(f"shard {path} is not listed in {self.index}: it is stale (left by another write) or "
                             "foreign (another set's); read the set by its directory, or list only its shards")
        return self.entries[name]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_vocab(index: str, meta: dict[str, Any]) -> None:
    """The vocabulary size every id is checked against: an int in [1, 2**32], within its dtype. A
    null, a string or an out-of-range value would turn the check off or fail at the first document."""
    vocab, dtype = meta.get("vocab_size"), meta.get("dtype")
    limit = {"uint16": 2**16, "uint32": 2**32}.get(dtype, 2**32)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= limit:
        raise ValueError(f"{index} has vocab_size {vocab!r}; expected an int in [1, {limit:,}]"
                         + (f" (its dtype {dtype})" if dtype else "") + "; the index is corrupt or not a shard index")


def _check(index: str, meta: dict[str, Any]) -> tuple[int, dict[str, dict[str, Any]]]:
    """The format version and the entries by name, from a read index; a ValueError naming the
    index for anything a reader would otherwise trust blindly."""
    fmt = meta.get("format", "varlen-packing-shards/1")
    if fmt not in FORMATS:
        raise ValueError(f"{index} has format {fmt!r}; this library reads {', '.join(FORMATS)}: upgrade packing, or "
                         "rewrite the set")
    version = FORMATS[fmt]
    if version >= 3:
        recorded, found = meta.get("checksum"), checksum(meta)
        if recorded != found:
            raise ValueError(f"{index} fails its checksum (it records {str(recorded)[:16]!r}, its contents give "
                             f"{found[:16]!r}): the index was edited or corrupted; restore it, or rewrite the set")
    check_vocab(index, meta)
    entries: dict[str, dict[str, Any]] = {}
    first = 0
    for entry in meta["shards"]:
        name = entry.get("tar") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", "..") \
                or "\\" in name:
            raise ValueError(f"{index} lists the shard {name!r}; a set's shards are bare file names inside its "
                             "directory (no path, no '..')")
        if name in entries:
            raise ValueError(f"{index} lists the shard {name!r} more than once; the index is corrupt")
        if version >= 3:
            hashes = entry.get("sha256")
            sound = (isinstance(hashes, dict) and all(isinstance(hashes.get(k), str) and len(hashes[k]) == 64
                                                      for k in KINDS)
                     and all(entry.get(k) == sidecar(name, k) for k in SIDECARS)
                     and all(_int(entry.get(k)) for k in ("docs", "tokens", "bytes")))
            if not sound:
                raise ValueError(f"{index}: the entry of shard {name!r} lacks, or mis-states, its files' names, "
                                 "hashes, docs, tokens or bytes; the index is corrupt")
        for key in ("docs", "tokens"):
            if key in entry and not _int(entry[key]):
                raise ValueError(f"{index}: shard {name!r} has {key} {entry[key]!r}; the index is corrupt")
        entries[name] = {**entry, "first": first}
        first += entry.get("docs", 0) if _int(entry.get("docs", 0)) else 0
    if version >= 3:
        missing = [key for key in ("docs", "tokens") if not _int(meta.get(key))]
        if missing or meta.get("set_id") != set_id(meta["shards"]):
            what = f"its total {missing[0]} ({meta.get(missing[0])!r})" if missing else \
                f"its set_id {meta.get('set_id')!r} (its shards' hashes give {set_id(meta['shards'])!r})"
            raise ValueError(f"{index} mis-states {what}; the index is corrupt")
    for key in ("docs", "tokens"):
        if key in meta and all(key in e for e in meta["shards"]):
            total = sum(e[key] for e in meta["shards"])
            if meta[key] != total:
                raise ValueError(f"{index} records {meta[key]!r} {key} in all, but its shards' entries add up to "
                                 f"{total:,}; the index is corrupt")
    return version, entries


_CACHE: dict[tuple[str, int, int, int], Manifest] = {}
_WARNED: set[str] = set()


def load(directory: str | Path) -> Manifest:
    """The checked manifest of the set in ``directory``; read once per version of its index.json.
    A directory without one is refused (a shard is read as part of its set)."""
    directory = os.path.abspath(directory)
    index = os.path.join(directory, "index.json")
    try:
        st = os.stat(index)
    except OSError:
        raise ValueError(f"{directory!r} has no index.json; write shards with python -m packing.data.shards (a shard "
                         "is read as part of its set: copy a set's directory whole)") from None
    key = (index, st.st_mtime_ns, st.st_size, st.st_ino)
    if key not in _CACHE:
        meta = read_index(index)
        version, entries = _check(index, meta)
        _CACHE[key] = Manifest(directory, index, meta, version, entries)
    manifest = _CACHE[key]
    if manifest.version < 3 and directory not in _WARNED:
        _WARNED.add(directory)
        unchecked = "" if manifest.version >= 2 else " Its documents have no checksums either."
        warnings.warn(
            f"shard set {directory} is {manifest.meta.get('format', 'varlen-packing-shards/1')}: its index.json has no "
            "checksum and no hashes of its files, so a swapped, foreign or stale shard, or an edited length index, "
            f"goes undetected.{unchecked} Upgrade it in place with {UPGRADE} {directory}", stacklevel=3)
    return manifest


def of_shard(path: str) -> Manifest:
    """The manifest of the set ``path`` belongs to: the index.json beside it."""
    return load(os.path.dirname(os.path.abspath(path)))
