"""Upgrade a shard set of format 1 or 2 to format 3 in place, and verify a set whole.

    python -m packing.data.shards --upgrade shards/     # format 1 or 2 -> 3, every document read once
    python -m packing.data.shards --verify shards/      # every file's SHA-256, every document's CRC-32

``upgrade`` reads every document of the set under the directory's writer lock. A format 2 document
must match its CRC-32, or the upgrade stops naming it and changes nothing the old index refers to.
A format 1 set has no checksums to match, so its CRC-32s record the bytes as they are now, and the
summary says so. Each shard then gains a ``.idcrc32.npy`` (and, from format 1, a ``.crc32.npy``).
The old index knows neither file, so a kill before the end leaves the old set readable. Last,
``index.json`` is replaced by a sealed format 3 manifest (a temporary file, fsync, rename).

Examples:
    >>> import json, tempfile, warnings
    >>> from pathlib import Path
    >>> from packing.data.shards import ShardWriter
    >>> out = Path(tempfile.mkdtemp())
    >>> with ShardWriter(out, vocab_size=259, tokenizer="bytes", shard_size=2) as w:
    ...     for i in range(3):
    ...         w.write(f"doc{i}", np.arange(1, i + 2, dtype=np.uint16))
    >>> meta = json.loads((out / "index.json").read_text())  # made a format 2 set, as older writers left it
    >>> meta["format"] = "varlen-packing-shards/2"
    >>> for entry in meta["shards"]:
    ...     del entry["sha256"], entry["bytes"]
    ...     (out / entry.pop("idcrc32")).unlink()
    >>> _ = (out / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("set_id", "checksum")}))
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # the format 2 warning
    ...     summary = upgrade(out)
    >>> summary["from"], summary["docs"], verify(out)["docs"]
    ('varlen-packing-shards/2', 3, 3)
"""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from packing.data.commit import lock, write_index
from packing.data.manifest import FORMAT, KINDS, file_sha256, load, seal, sidecar
from packing.data.shard_reader import CorruptDocument, _decode_id, _decode_tokens, _ShardFiles, scan_shard


def _documents(path: str):
    """(token member bytes, id member bytes) of every document of the shard at ``path``, checked as
    a reader checks them."""
    info, files = scan_shard(path), _ShardFiles()
    for j in range(len(info.lengths)):
        data = files.read(path, int(info.offsets[j]), int(info.sizes[j]))
        name = files.read(path, int(info.id_offsets[j]), int(info.id_sizes[j]))
        _decode_tokens(data, info, j)
        _decode_id(name, info, j)
        yield data, name


def _save(path: str, array: np.ndarray) -> None:
    """Write a sidecar at once: a temporary file beside it, renamed over it."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def upgrade(directory: str | Path) -> dict[str, Any]:
    """Rewrite the set's index as a sealed format 3 manifest; returns ``{"from", "shards", "docs",
    "checked"}``, ``checked`` False for a format 1 set (nothing to check its bytes against).

    Raises:
        ValueError: the set is format 3 already, is being written, or a document fails its check
            (named; the old index still describes the set).
    """
    out = Path(directory)
    held = lock(out, "--upgrade")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old format's warning: upgrading is the answer to it
            manifest = load(out)
        if manifest.version >= 3:
            raise ValueError(f"{out} is already {FORMAT}; nothing to upgrade (--verify {out} checks it whole)")
        meta = {k: v for k, v in manifest.meta.items() if k not in ("format", "shards")}
        entries = []
        for path in manifest.paths:
            crcs, id_crcs = [], []
            try:
                for data, name in _documents(path):
                    crcs.append(zlib.crc32(data))
                    id_crcs.append(zlib.crc32(name))
            except ValueError as e:  # a corrupt document included: the set is damaged, not upgradable
                raise ValueError(f"cannot upgrade {out}: {e}; the old index.json is kept: rewrite the set from its "
                                 "source") from None
            lengths = np.load(sidecar(path, "lengths"), allow_pickle=False)
            if manifest.version < 2:
                _save(sidecar(path, "crc32"), np.asarray(crcs, dtype=np.uint32))
            _save(sidecar(path, "idcrc32"), np.asarray(id_crcs, dtype=np.uint32))
            name = os.path.basename(path)
            entry = {"tar": name, **{k: os.path.basename(sidecar(path, k)) for k in KINDS[1:]},
                     "docs": len(crcs), "tokens": int(lengths.sum()), "bytes": os.path.getsize(path)}
            entry["sha256"] = {k: file_sha256(os.path.join(out, entry[k])) for k in KINDS}
            entries.append(entry)
        meta.update(format=FORMAT, shards=entries, docs=sum(e["docs"] for e in entries),
                    tokens=sum(e["tokens"] for e in entries))
        write_index(out, seal(meta), out / ".index.json.tmp")
        load(out)  # the manifest just written reads back (its checksum, names and totals)
        return {"from": manifest.meta.get("format", "varlen-packing-shards/1"), "shards": len(entries),
                "docs": meta["docs"], "checked": manifest.version >= 2}
    finally:
        held.close()


def verify(directory: str | Path) -> dict[str, int]:
    """Check a format 3 set whole: every file's SHA-256 and size against the manifest, every shard's
    structure, every document's tokens and id against their CRC-32s. Returns ``{"shards", "docs",
    "tokens"}``; the first failure is a ValueError naming the file or the document."""
    manifest = load(directory)
    if manifest.version < 3:
        raise ValueError(f"{manifest.directory} is {manifest.meta.get('format', 'varlen-packing-shards/1')}: it has no "
                         f"hashes to verify; upgrade it first: python -m packing.data.shards --upgrade {directory}")
    docs = tokens = 0
    for path in manifest.paths:
        entry = manifest.entry(path)
        for kind in KINDS:
            file = path if kind == "tar" else sidecar(path, kind)
            try:
                found = file_sha256(file)
            except OSError as e:
                raise ValueError(f"shard {path}: {os.path.basename(file)} cannot be read ({e.strerror or e})") from None
            if found != entry["sha256"][kind]:
                raise ValueError(f"shard {path}: {os.path.basename(file)} has SHA-256 {found[:12]}, "
                                 f"{manifest.index} records {entry['sha256'][kind][:12]}; restore it, or rewrite the set")
        try:
            for data, _ in _documents(path):
                docs += 1
        except CorruptDocument as e:
            raise ValueError(str(e)) from None
        tokens += entry["tokens"]
    return {"shards": len(manifest.paths), "docs": docs, "tokens": tokens}
