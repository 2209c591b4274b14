"""How a shard set's files reach disk: one writer to a directory at a time, each file flushed to
disk before it is named, and ``index.json`` replaced in one rename, so a reader sees the old set or
the new, never a torn one. :class:`~packing.data.shards.ShardWriter` commits a new set this way and
:func:`~packing.data.upgrade.upgrade` rewrites an old one.

Example::

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> held = lock(out)
    >>> lock(out)
    Traceback (most recent call last):
    ...
    ValueError: --output '...' is being written by another writer (pid ...); wait for it to finish, or choose another directory
    >>> write_index(out, {"format": "example"}, out / ".index.json.tmp")
    >>> json.loads((out / "index.json").read_text())
    {'format': 'example'}
    >>> held.close()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOCK = ".lock"  # held (flock) by the one writer of a directory; the kernel drops it if the writer dies


def lock(out: Path, flag: str = "--output"):
    """An exclusive lock on ``out``, held open until the writer commits or fails; a second writer is
    refused, its message naming ``out`` by the command-line ``flag`` that chose it. SIGKILL releases
    the lock (the kernel closes the descriptor)."""
    import fcntl

    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{flag} {str(out)!r} is being written by another writer ({holder}); wait for it to "
                         "finish, or choose another directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def write_index(out: Path, meta: dict[str, Any], temporary: Path) -> None:
    """Replace ``out/index.json`` with ``meta`` at once: written to ``temporary`` (on the same file
    system), flushed to disk, renamed over it. A reader sees the old index or the new, never a torn one."""
    temporary.write_text(json.dumps(meta, indent=2) + "\n")
    fsync(temporary)
    os.replace(temporary, out / "index.json")
    fsync_dir(out)


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
