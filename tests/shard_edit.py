"""Edit a written shard set the way a forger, a hand edit or another tool would: the tests use it
to reach the checks beneath the index's checksum and the files' hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from packing.data.manifest import KINDS, file_sha256, seal


def reseal(out: Path, edit: Callable[[dict[str, Any]], None] = lambda meta: None) -> None:
    """Apply ``edit`` to ``out``'s index.json and seal it again (a valid checksum over the edit)."""
    meta = json.loads((out / "index.json").read_text())
    edit(meta)
    (out / "index.json").write_text(json.dumps(seal(meta)))


def rehash(out: Path) -> None:
    """Record every shard's files as they now are (hashes, tar size, tokens from its length index,
    the totals) and reseal: the index then vouches for damaged files, so only the deeper checks
    can catch the damage. Document counts stay: they place every later shard's keys."""
    def edit(meta: dict[str, Any]) -> None:
        for entry in meta["shards"]:
            lengths = out / entry["lengths"]
            if lengths.is_file():
                try:
                    counts = np.load(lengths, allow_pickle=False)
                    entry["tokens"] = int(counts.sum())
                except ValueError:
                    pass
            entry["sha256"] = {k: file_sha256(out / entry[k]) if (out / entry[k]).is_file() else "0" * 64 for k in KINDS}
            entry["bytes"] = (out / entry["tar"]).stat().st_size if (out / entry["tar"]).is_file() else 0
        meta["docs"] = sum(e["docs"] for e in meta["shards"])
        meta["tokens"] = sum(e["tokens"] for e in meta["shards"])
    reseal(out, edit)


def downgrade(out: Path, version: int) -> None:
    """Make ``out`` a set as this library's writer of format ``version`` (1 or 2) left it: no set
    id, checksum, hashes or id checksums; format 1 has no per-document checksums either."""
    meta = json.loads((out / "index.json").read_text())
    meta["format"] = f"varlen-packing-shards/{version}"
    for key in ("set_id", "checksum"):
        meta.pop(key)
    for entry in meta["shards"]:
        for key in ("sha256", "bytes"):
            entry.pop(key)
        for kind in ("idcrc32",) + (("crc32",) if version == 1 else ()):
            (out / entry.pop(kind)).unlink()
    (out / "index.json").write_text(json.dumps(meta, indent=2))
