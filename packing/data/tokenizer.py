"""Tokenizers for writing shards: raw bytes, or a Hugging Face ``tokenizers`` file you supply."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """Exactly one token per byte of the input: ids 0-255 are the bytes, then pad, BOS and EOS.

    Text is never decoded, so bytes that are not valid UTF-8 are kept as they are.

    Examples:
        >>> ByteTokenizer().encode("hé").tolist()
        [104, 195, 169]
    """

    name = "bytes"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: bytes | str) -> np.ndarray:
        """(num_bytes,) uint16 ids. A str is encoded as UTF-8, with surrogateescape, so bytes that
        were read from an invalid-UTF-8 source come back unchanged."""
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file from disk; nothing is downloaded.

    Invalid UTF-8 in the input becomes U+FFFD (the tokenizer takes only valid text), and the count
    of such documents is kept in ``replaced``; use the byte tokenizer to keep raw bytes.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():  # first: a wrong path is the likelier mistake, with or without the package
            raise ValueError(f"tokenizer file {str(path)!r} does not exist; pass --tokenizer bytes or a tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("--tokenizer PATH needs the tokenizers package: pip install tokenizers") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
            raise ValueError(f"tokenizer file {str(path)!r} is not a Hugging Face tokenizer.json: {e}") from None
        # Recorded by content: the same path may hold another tokenizer tomorrow, and the same
        # tokenizer may be typed as another relative path.
        self.name = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.replaced = 0

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        decoded = text.decode("utf-8", "replace")
        if "\ufffd" in decoded and "\ufffd".encode() not in text:
            self.replaced += 1
        ids = self._tok.encode(decoded, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.uint16 if self.vocab_size <= 65536 else np.uint32)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` for :class:`ByteTokenizer`, else a path to a tokenizer.json."""
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
