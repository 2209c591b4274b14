"""Write tokenized documents as webdataset shards, with a length index beside each shard.

    python -m packing.data.shards --input texts/ --output shards/ --tokenizer bytes
    python -m packing.data.shards --input data.jsonl --output shards/ --tokenizer tokenizer.json --shard-size 5000

Layout of ``--output``::

    shard-000000.tar            webdataset tar: per document, KEY.tokens.npy and KEY.id.txt
    shard-000000.lengths.npy    (docs_in_shard,) int64 token counts, in tar order
    ...
    index.json                  format, tokenizer, vocab size, and per shard: docs, tokens, files

``KEY`` is the document's 9-digit position in the whole set. ``tokens.npy`` is a 1-D uint16 (or
uint32 for vocabularies over 65,536) array written with ``np.save(..., allow_pickle=False)``;
``id.txt`` is the source file's relative path, or the JSONL ``id`` field (else ``FILE:LINE``).
Readers need nothing but numpy and tarfile, and never unpickle.

Inputs: a directory (every file under it, sorted, is one document, read as raw bytes), or a JSONL
file whose lines are objects with a string ``text`` field. Empty documents are skipped and counted;
bytes that are not valid UTF-8 are kept (byte tokenizer).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from packing.cli import Parser
from packing.validate import positive_int
from packing.data.tokenizer import ByteTokenizer, load_tokenizer

FORMAT = "varlen-packing-shards/1"
TOKENS, DOC_ID = "tokens.npy", "id.txt"


def iter_documents(path: str | Path) -> Iterator[tuple[str, bytes | str]]:
    """(doc_id, raw text) for every document under ``path``: files of a directory, or JSONL lines."""
    path = Path(path)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield f.relative_to(path).as_posix(), f.read_bytes()
        return
    if not path.is_file():
        raise ValueError(f"--input {str(path)!r} does not exist; give a directory of text files or a JSONL file")
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


def count_documents(path: str | Path) -> int | None:
    """How many documents ``iter_documents`` will yield, cheaply, for the progress bar."""
    path = Path(path)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.is_file())
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

    Example:
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
        self.out = Path(out_dir)
        if (self.out / "index.json").exists():
            raise ValueError(f"--output {str(self.out)!r} already holds shards (index.json); choose an empty directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        self.shard_size, self.prefix = shard_size, prefix
        self.summary = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": vocab_size,
                        "dtype": np.dtype(self.dtype).name, "docs": 0, "tokens": 0, "skipped_empty": 0, "shards": []}
        self._tar: tarfile.TarFile | None = None
        self._lengths: list[int] = []

    def write(self, doc_id: str, tokens: np.ndarray) -> None:
        """Add one document; an empty one is skipped and counted in ``skipped_empty``."""
        if len(tokens) == 0:
            self.summary["skipped_empty"] += 1
            return
        if self._tar is None:
            name = f"{self.prefix}-{len(self.summary['shards']):06d}"
            self._tar = tarfile.open(self.out / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT)
            self.summary["shards"].append({"tar": f"{name}.tar", "lengths": f"{name}.lengths.npy", "docs": 0, "tokens": 0})
        key = f"{self.summary['docs']:09d}"
        _add(self._tar, f"{key}.{TOKENS}", _npy(np.asarray(tokens, dtype=self.dtype)))
        _add(self._tar, f"{key}.{DOC_ID}", doc_id.encode("utf-8", "surrogateescape"))
        self._lengths.append(len(tokens))
        self.summary["docs"] += 1
        self.summary["tokens"] += len(tokens)
        if len(self._lengths) == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        shard = self.summary["shards"][-1]
        np.save(self.out / shard["lengths"], np.asarray(self._lengths, dtype=np.int64), allow_pickle=False)
        shard["docs"], shard["tokens"] = len(self._lengths), int(sum(self._lengths))
        self._tar, self._lengths = None, []

    def close(self) -> None:
        self._close_shard()
        (self.out / "index.json").write_text(json.dumps(self.summary, indent=2) + "\n")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(documents: Iterable[tuple[str, bytes | str]], out_dir: str | Path, *, tokenizer: str = "bytes",
                 shard_size: int = 10_000, add_bos: bool = False, add_eos: bool = False,
                 total: int | None = None, progress: bool = True) -> dict:
    """Tokenize ``documents`` and write them as shards; returns the ``index.json`` summary."""
    tok = load_tokenizer(tokenizer)
    if (add_bos or add_eos) and not isinstance(tok, ByteTokenizer):
        raise ValueError("--add-bos/--add-eos work with --tokenizer bytes; for a tokenizer.json, set its post-processor")
    with ShardWriter(out_dir, vocab_size=tok.vocab_size, tokenizer=tok.name, shard_size=shard_size) as writer:
        for doc_id, text in tqdm(documents, total=total, unit="doc", disable=not progress, desc="writing shards"):
            ids = tok.encode(text)
            if len(ids) and (add_bos or add_eos):
                ids = np.concatenate([[tok.bos_id]] * add_bos + [ids] + [[tok.eos_id]] * add_eos).astype(ids.dtype)
            writer.write(doc_id, ids)
    summary = writer.summary
    summary["replaced_invalid_utf8"] = getattr(tok, "replaced", 0)
    (Path(out_dir) / "index.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m packing.data.shards", description="Tokenize text into webdataset shards with length indexes.")
    p.add_argument("--input", required=True, help="a directory of text files, or a JSONL file with a 'text' field")
    p.add_argument("--output", required=True, help="an empty or new directory for the shards")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (one token per byte) or a tokenizer.json path")
    p.add_argument("--shard-size", type=int, default=10_000, help="documents per shard (default 10,000)")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS (byte tokenizer only)")
    p.add_argument("--add-eos", action="store_true", help="append EOS (byte tokenizer only)")
    args = p.parse_args(argv)
    try:
        summary = write_shards(iter_documents(args.input), args.output, tokenizer=args.tokenizer,
                               shard_size=args.shard_size, add_bos=args.add_bos, add_eos=args.add_eos,
                               total=count_documents(args.input), progress=sys.stderr.isatty())
    except (ValueError, ImportError) as e:
        return p.fail(e)
    print(f"wrote {summary['docs']:,} documents, {summary['tokens']:,} tokens in {len(summary['shards'])} shards "
          f"to {args.output}; skipped {summary['skipped_empty']} empty"
          + (f"; {summary['replaced_invalid_utf8']} had invalid UTF-8 replaced" if summary["replaced_invalid_utf8"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
