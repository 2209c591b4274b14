"""Write tokenized documents as webdataset shards, with a length index beside each shard.

    python -m packing.data.shards --input texts/ --output shards/ --tokenizer bytes
    python -m packing.data.shards --input data.jsonl --output shards/ --tokenizer tokenizer.json --shard-size 5000
    python -m packing.data.shards --upgrade old_shards/      # a format 1 or 2 set, in place, to format 3
    python -m packing.data.shards --verify shards/           # every file's hash, every document's checksum

The set is committed at once: shards are staged in ``--output/.staging/`` and ``index.json`` is
written last (temporary file, fsync, rename), only when the whole input was written; an error or a
signal leaves no index, and a re-run starts clean. One writer at a time holds ``--output/.lock``.

Layout of ``--output``::

    shard-000000.tar             webdataset tar: per document, KEY.tokens.npy and KEY.id.txt
    shard-000000.lengths.npy     (docs_in_shard,) int64 token counts, in tar order
    shard-000000.crc32.npy       (docs_in_shard,) uint32 CRC-32 of each KEY.tokens.npy member's bytes
    shard-000000.idcrc32.npy     (docs_in_shard,) uint32 CRC-32 of each KEY.id.txt member's bytes
    ...
    index.json                   the sealed manifest (format 3, :mod:`packing.data.manifest`): the
                                 tokenizer, vocab size, totals, and per shard its files' SHA-256s

``KEY`` is the document's 9-digit position in the whole set. ``tokens.npy`` is a 1-D uint16 (or
uint32 for vocabularies over 65,536) array written with ``np.save(..., allow_pickle=False)``;
``id.txt`` is the source file's relative path, or the JSONL ``id`` field (else ``FILE:LINE``).
Readers need nothing but numpy, tarfile, zlib and hashlib, and never unpickle. They check the set
against its manifest, and each document and id against its CRC-32 and ids against ``vocab_size``,
before handing it out. Sets of formats 1 and 2 still read, with a warning naming what goes
unchecked; ``--upgrade DIR`` rewrites one in place as format 3, and ``--verify DIR`` checks a set
whole.

Inputs: a directory (every file under it, sorted, is one document, read as raw bytes), or a JSONL
file whose lines are objects with a string ``text`` field. Hidden files and folders (``.git/``),
files that are not text (a NUL byte in their first 8 KiB) and, with ``--include GLOB``, files that
match no glob are skipped; empty documents are skipped too; each kind is counted and printed. An
input with no document is an error. Bytes that are not valid UTF-8 are kept (byte tokenizer).
The tokenizer is recorded by the SHA-256 of its file (``index.json``'s ``tokenizer``), never by
the path typed.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from packing.cli import Parser
from packing.validate import positive_int
from packing.data.commit import fsync, fsync_dir, lock, write_index
from packing.data.manifest import DOC_ID, FORMAT, KINDS, TOKENS, file_sha256, seal, sidecar
from packing.data.split import CLI_FIX, TOO_LONG, check_policy, plan_chunks
from packing.data.tokenizer import ByteTokenizer, load_tokenizer


BINARY_PROBE = 8192  # bytes read to tell text from binary: a NUL among them means binary, as git decides


class Scan:
    """What a directory walk saw: the files it will read, and each kind it skipped (counted)."""

    def __init__(self) -> None:
        self.skipped = {"hidden": 0, "binary": 0, "not_included": 0}

    def line(self) -> str:
        parts = [f"{n:,} {kind.replace('_', ' ')}" for kind, n in self.skipped.items() if n]
        return ", ".join(parts)


def _files(path: Path, include: list[str] | None, scan: Scan) -> list[Path]:
    """The files under ``path`` to read, sorted: none under a hidden folder (``.git/``) or hidden
    itself, and only those matching an ``include`` glob when given (on the path relative to ``path``)."""
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            scan.skipped["hidden"] += 1
        elif include and not any(fnmatch.fnmatch(rel.as_posix(), g) or fnmatch.fnmatch(f.name, g) for g in include):
            scan.skipped["not_included"] += 1
        else:
            files.append(f)
    return files


def iter_documents(path: str | Path, *, include: list[str] | None = None,
                   scan: Scan | None = None) -> Iterator[tuple[str, bytes | str]]:
    """(doc_id, raw text) for every document under ``path``: files of a directory, or JSONL lines.

    In a directory, hidden files and folders, files that are not text (a NUL byte in their first
    8 KiB) and, with ``include``, files matching none of its globs are skipped and counted in
    ``scan.skipped``.
    """
    path = Path(path)
    scan = scan if scan is not None else Scan()
    if path.is_dir():
        for f in _files(path, include, scan):
            data = f.read_bytes()
            if b"\0" in data[:BINARY_PROBE]:
                scan.skipped["binary"] += 1
                continue
            yield f.relative_to(path).as_posix(), data
        return
    if not path.is_file():
        raise ValueError(f"--input {str(path)!r} does not exist; give a directory of text files or a JSONL file")
    if include:
        raise ValueError(f"--include selects files of a directory; --input {str(path)!r} is one JSONL file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                # surrogateescape: invalid UTF-8 survives parsing and is restored byte for byte later
                record = json.loads(raw.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno} of {path.name} is not valid JSON ({e.msg}); expected one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"line {lineno} of {path.name} has no string 'text' field; expected {{\"text\": \"...\"}}")
            doc_id = record.get("id")
            yield (str(doc_id) if doc_id is not None else f"{path.name}:{lineno}"), record["text"]


def count_documents(path: str | Path, *, include: list[str] | None = None) -> int | None:
    """How many documents ``iter_documents`` will yield at most, cheaply, for the progress bar."""
    path = Path(path)
    if path.is_dir():
        return len(_files(path, include, Scan()))
    if path.is_file():
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes (doc_id, tokens) pairs into shards of ``shard_size`` documents, then ``index.json``.

    Examples:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with ShardWriter(out, vocab_size=259, tokenizer="bytes", shard_size=2) as w:
        ...     for i in range(3):
        ...         w.write(f"doc{i}", np.arange(i + 1, dtype=np.uint16))
        >>> w.summary["docs"], [s["docs"] for s in w.summary["shards"]]
        (3, [2, 1])
    """

    def __init__(self, out_dir: str | Path, *, vocab_size: int, tokenizer: str, shard_size: int = 10_000,
                 prefix: str = "shard") -> None:
        positive_int("--shard-size", shard_size, meaning="documents per shard")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size <= 2**32:
            raise ValueError(f"vocab_size is {vocab_size!r}; shards store ids as uint16 or uint32, so it must be an int "
                             f"in [1, {2**32:,}]")
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--output {str(self.out)!r} is a file; give a new or empty directory for the shards")
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = lock(self.out)  # before anything is read or removed: one writer at a time
        try:
            if (self.out / "index.json").exists():
                raise ValueError(f"--output {str(self.out)!r} already holds shards (index.json); choose an empty directory")
            self.stage = self.out / STAGING
            _clean(self.out, self.stage, prefix)  # what a killed run left: it never had an index
            self.stage.mkdir()
        except BaseException:
            self._unlock()
            raise
        self.dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        self.shard_size, self.prefix = shard_size, prefix
        self.summary = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": vocab_size,
                        "dtype": np.dtype(self.dtype).name, "docs": 0, "tokens": 0, "skipped_empty": 0, "shards": []}
        self._tar: tarfile.TarFile | None = None
        self._lengths: list[int] = []
        self._crcs: list[int] = []
        self._id_crcs: list[int] = []

    def write(self, doc_id: str, tokens: np.ndarray) -> None:
        """Add one document; an empty one is skipped and counted in ``skipped_empty``."""
        if len(tokens) == 0:
            self.summary["skipped_empty"] += 1
            return
        if self._tar is None:
            name = f"{self.prefix}-{len(self.summary['shards']):06d}"
            self._tar = tarfile.open(self.stage / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT)
            self.summary["shards"].append({"tar": f"{name}.tar", **{k: sidecar(f"{name}.tar", k) for k in KINDS[1:]},
                                           "docs": 0, "tokens": 0})
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"document {doc_id!r} is {tokens.dtype} {tuple(tokens.shape)}; write 1-D integer token ids")
        if tokens.min() < 0 or tokens.max() >= self.summary["vocab_size"]:
            bad = int(np.flatnonzero((tokens < 0) | (tokens >= self.summary["vocab_size"]))[0])
            raise ValueError(f"document {doc_id!r} has token id {int(tokens[bad])} at position {bad}, outside the "
                             f"vocabulary [0, {self.summary['vocab_size']}); fix the tokenizer or pass its vocab_size")
        key = f"{self.summary['docs']:09d}"
        payload = _npy(tokens.astype(self.dtype))
        _add(self._tar, f"{key}.{TOKENS}", payload)
        name = doc_id.encode("utf-8", "surrogateescape")
        _add(self._tar, f"{key}.{DOC_ID}", name)
        self._lengths.append(len(tokens))
        self._crcs.append(zlib.crc32(payload))
        self._id_crcs.append(zlib.crc32(name))
        self.summary["docs"] += 1
        self.summary["tokens"] += len(tokens)
        if len(self._lengths) == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        shard = self.summary["shards"][-1]
        np.save(self.stage / shard["lengths"], np.asarray(self._lengths, dtype=np.int64), allow_pickle=False)
        np.save(self.stage / shard["crc32"], np.asarray(self._crcs, dtype=np.uint32), allow_pickle=False)
        np.save(self.stage / shard["idcrc32"], np.asarray(self._id_crcs, dtype=np.uint32), allow_pickle=False)
        shard["docs"], shard["tokens"] = len(self._lengths), int(sum(self._lengths))
        shard["bytes"] = (self.stage / shard["tar"]).stat().st_size
        # Hashed from the staged files, so the manifest describes the bytes a reader will find.
        shard["sha256"] = {kind: file_sha256(self.stage / shard[kind]) for kind in KINDS}
        self._tar, self._lengths, self._crcs, self._id_crcs = None, [], [], []

    def close(self) -> None:
        """Commit the set: the staged shards move into the directory, then ``index.json`` is written
        (a temporary file, flushed to disk, renamed), last: until that rename no reader sees a set."""
        try:
            self._close_shard()
            seal(self.summary)
            for shard in self.summary["shards"]:
                for kind in KINDS:
                    fsync(self.stage / shard[kind])
                    os.replace(self.stage / shard[kind], self.out / shard[kind])
            fsync_dir(self.out)
            write_index(self.out, self.summary, self.stage / "index.json")
            self.stage.rmdir()
        finally:
            self._unlock()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            try:
                self.close()
            except BaseException as error:  # an error or a signal mid-commit
                self._abandon(error)
                raise
            return
        self._abandon(value)

    def _abandon(self, error: BaseException | None) -> None:
        """An error, Ctrl-C or any signal turned exception mid-write: the documents so far are not
        the set, so no index.json says they are, and the partial shards go (readers refuse a
        directory without an index; a re-run starts clean). A commit whose index is in place is
        the whole set and stays."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if not (self.out / "index.json").exists():
            _clean(self.out, self.stage, self.prefix)
            if hasattr(error, "add_note"):
                error.add_note(f"nothing was written to {str(self.out)!r}: no index.json, the partial shards removed")
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None


STAGING = ".staging"  # where shards are written before the commit; hidden, so no reader looks there
def _clean(out: Path, stage: Path, prefix: str) -> None:
    """Remove what a killed writer left in ``out`` (no index.json there): its staging folder, and
    shards of this writer's naming that a commit had begun to move in."""
    shutil.rmtree(stage, ignore_errors=True)
    own = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.(tar|lengths\.npy|crc32\.npy|idcrc32\.npy)$")
    for path in out.iterdir():
        if path.is_file() and own.match(path.name):
            path.unlink()




class Progress:
    """Progress of a long write on stderr: tqdm's bar on a terminal; elsewhere (a log file, a pipe, a
    notebook's captured stream) a plain line every ``every`` seconds, so no run is silent for long."""

    def __init__(self, total: int | None, *, enabled: bool = True, every: float = 10.0) -> None:
        self.total, self.every, self.done = total, every, 0
        self.bar = tqdm(total=total, unit="doc", desc="writing shards") if enabled and sys.stderr.isatty() else None
        self.enabled, self.start = enabled, time.monotonic()
        self.last = self.start

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            of = f" of {self.total:,} ({self.done / self.total:.0%})" if self.total else ""
            print(f"writing shards: {self.done:,}{of} documents read, {self.last - self.start:.0f} s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_shards(documents: Iterable[tuple[str, bytes | str]], out_dir: str | Path, *, tokenizer: str = "bytes",
                 shard_size: int = 10_000, add_bos: bool = False, add_eos: bool = False,
                 max_len: int | None = None, too_long: str = "error",
                 total: int | None = None, progress: bool = True, scan: Scan | None = None) -> dict:
    """Tokenize ``documents`` and write them as shards; returns the ``index.json`` summary.

    ``max_len`` / ``too_long`` is the policy of :mod:`packing.data.split`, applied as each document
    is tokenized: "error" stops at the first one over ``max_len`` naming it; "split" writes its
    chunks as documents of their own, with ids ``ID[start:end]`` (the last token of each chunk then
    has no target in training: one per cut, counted in ``targets_lost_at_cuts``; split in the reader
    instead, ``ShardStream(max_len=...)``, to keep them); "truncate" keeps the first ``max_len``.
    ``scan`` is the :class:`Scan` of :func:`iter_documents`, whose skips the summary records.

    Raises:
        ValueError: no document to write (nothing is left behind then), or the policy's refusal.
    """
    tok = load_tokenizer(tokenizer)
    check_policy(max_len, too_long, names=("--max-len", "--too-long"))
    if (add_bos or add_eos) and not isinstance(tok, ByteTokenizer):
        raise ValueError("--add-bos/--add-eos work with --tokenizer bytes; for a tokenizer.json, set its post-processor")
    counts = {"split": 0, "split_chunks": 0, "targets_lost_at_cuts": 0, "truncated": 0, "dropped_tokens": 0}
    scan = scan if scan is not None else Scan()
    bar = Progress(total, enabled=progress)
    try:
        with ShardWriter(out_dir, vocab_size=tok.vocab_size, tokenizer=tok.name, shard_size=shard_size) as writer:
            for doc_id, text in documents:
                bar.step()
                ids = tok.encode(text)
                if len(ids) and (add_bos or add_eos):
                    ids = np.concatenate([[tok.bos_id]] * add_bos + [ids] + [[tok.eos_id]] * add_eos).astype(ids.dtype)
                if max_len is None or len(ids) <= max_len:
                    writer.write(doc_id, ids)
                    continue
                plan = plan_chunks([len(ids)], max_len, too_long, name=lambda _: f"document {doc_id!r}",
                                   limit="--max-len ", fix=CLI_FIX)
                for start, n in zip(plan.start.tolist(), plan.length.tolist()):
                    writer.write(doc_id if too_long == "truncate" else f"{doc_id}[{start}:{start + n}]",
                                 ids[start:start + n])
                counts["split"] += plan.split
                counts["split_chunks"] += plan.split_chunks
                counts["targets_lost_at_cuts"] += max(plan.split_chunks - 1, 0)
                counts["truncated"] += plan.truncated
                counts["dropped_tokens"] += plan.dropped_tokens
            writer.summary["too_long"] = {"max_len": max_len, "policy": too_long, **counts}
            writer.summary["replaced_invalid_utf8"] = getattr(tok, "replaced", 0)
            writer.summary["skipped_files"] = dict(scan.skipped)
            if writer.summary["docs"] == 0:
                skipped = ", ".join(x for x in (scan.line(), f"{writer.summary['skipped_empty']:,} empty"
                                                if writer.summary["skipped_empty"] else "") if x)
                raise ValueError(f"the input holds no document to write (skipped: {skipped or 'nothing'}); "
                                 "point --input at text files or a JSONL file with 'text' fields (--include GLOB selects files)")
    finally:
        bar.close()
    return writer.summary


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _maintain(p: Parser, upgrade_dir: str | None, verify_dir: str | None) -> int:
    """``--upgrade DIR`` or ``--verify DIR``: one line of result, or one line of error."""
    from packing.data.upgrade import upgrade, verify

    try:
        if upgrade_dir:
            done = upgrade(upgrade_dir)
            how = ("every document matched its checksum" if done["checked"] else
                   "format 1 had no checksums: they now record the bytes as they are")
            print(f"upgraded {upgrade_dir} from {done['from']} to {FORMAT}: {done['shards']} shards, "
                  f"{done['docs']:,} documents; {how}")
        else:
            done = verify(verify_dir)
            print(f"verified {verify_dir}: {done['shards']} shards, {done['docs']:,} documents, {done['tokens']:,} "
                  "tokens; every file matches its hash and every document its checksum")
    except ValueError as e:
        return p.fail(str(e))
    except OSError as e:
        return p.fail(f"{e.strerror or e}: {e.filename or upgrade_dir or verify_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m packing.data.shards", description="Tokenize text into webdataset shards with length indexes.")
    p.add_argument("--input", help="a directory of text files, or a JSONL file with a 'text' field")
    p.add_argument("--output", help="an empty or new directory for the shards")
    p.add_argument("--upgrade", metavar="DIR", help="rewrite a set of format 1 or 2 in place as format 3 (sealed)")
    p.add_argument("--verify", metavar="DIR", help="check a set whole: every file's hash, every document's checksum")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (one token per byte) or a tokenizer.json path")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="only files whose path under --input (or name) matches GLOB, e.g. '*.txt' (repeatable)")
    p.add_argument("--shard-size", type=int, default=10_000, help="documents per shard (default 10,000)")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS (byte tokenizer only)")
    p.add_argument("--add-eos", action="store_true", help="append EOS (byte tokenizer only)")
    p.add_argument("--max-len", type=int, help="the longest document to write (default: no limit)")
    p.add_argument("--too-long", choices=TOO_LONG,
                   help="a document over --max-len: error (default), split into chunks, or truncate; needs --max-len")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    args = p.parse_args(argv)
    if args.upgrade or args.verify:
        if args.upgrade and args.verify or args.input or args.output:
            p.error("--upgrade DIR and --verify DIR each run alone, without --input/--output")
        return _maintain(p, args.upgrade, args.verify)
    if not args.input or not args.output:
        p.error("--input and --output are required to write shards (or --upgrade DIR, --verify DIR)")
    if args.too_long is not None and args.max_len is None:
        p.error(f"--too-long {args.too_long} needs --max-len N, the longest document to write; without it no "
                "document is too long")
    args.too_long = args.too_long or "error"
    # SIGTERM (a scheduler's stop, kill) ends the write like Ctrl-C: no index, the partial shards removed.
    signal.signal(signal.SIGTERM, _interrupt)
    scan = Scan()
    try:
        summary = write_shards(iter_documents(args.input, include=args.include, scan=scan), args.output,
                               tokenizer=args.tokenizer, shard_size=args.shard_size, add_bos=args.add_bos,
                               add_eos=args.add_eos, max_len=args.max_len, too_long=args.too_long,
                               total=count_documents(args.input, include=args.include),
                               progress=not args.no_progress, scan=scan)
    except (ValueError, ImportError) as e:
        return p.fail("; ".join([str(e), *getattr(e, "__notes__", [])]))
    except OSError as e:  # a disk that is full, a directory we may not write: one line, not a traceback
        return p.fail("; ".join([f"{e.strerror or e}: {e.filename or args.output}", *getattr(e, "__notes__", [])]))
    except KeyboardInterrupt as e:
        p.fail("; ".join([f"interrupted ({e.args[0] if e.args else 'SIGINT'})", *getattr(e, "__notes__", [])]))
        return 128 + (signal.SIGTERM if e.args == ("SIGTERM",) else signal.SIGINT)
    skipped = scan.line()
    print(f"wrote {summary['docs']:,} documents, {summary['tokens']:,} tokens in {len(summary['shards'])} shards "
          f"to {args.output}; skipped {summary['skipped_empty']} empty"
          + (f", {skipped}" if skipped else "")
          + (f"; {summary['replaced_invalid_utf8']} had invalid UTF-8 replaced" if summary["replaced_invalid_utf8"] else ""))
    lg = summary["too_long"]
    if lg["split"]:
        print(f"split {lg['split']:,} documents over --max-len {args.max_len} into {lg['split_chunks']:,} chunks "
              f"(no token dropped; {lg['targets_lost_at_cuts']:,} next-token targets lost at the cuts)")
    if lg["truncated"]:
        print(f"truncated {lg['truncated']:,} documents over --max-len {args.max_len}, {lg['dropped_tokens']:,} tokens dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
