"""Documents longer than a budget: one policy, ``max_len=N, too_long="error" | "split" | "truncate"``,
wherever documents enter (``SplitDocuments``, ``ShardStream``, the shards CLI, ``packing.report``,
``benchmarks.varlen``).

- ``"error"``: a document over ``max_len`` raises ``ValueError`` naming it, its length and the fix.
- ``"split"``: it is cut into consecutive chunks of ``max_len`` tokens (the last one shorter). Every
  token is kept, and each chunk keeps the document's own next-token targets, so the last target of
  a chunk is the first token of the next one (where both come from one read of the document).
- ``"truncate"``: its first ``max_len`` tokens are kept and the rest is dropped and counted.

The plan is made from lengths alone (:func:`plan_chunks`), so a sampler or a resumable stream can
count chunks, and give them positions, before reading a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from packing.boundaries import ceil_div
from packing.data.indexed import LengthIndexed
from packing.sample import IGNORE_INDEX, Sample, as_sample
from packing.validate import positive_int

TOO_LONG = ("error", "split", "truncate")


def check_policy(max_len: int | None, too_long: str, *, names: tuple[str, str] = ("max_len", "too_long")) -> None:
    """Refuse an unknown policy or a ``max_len`` below 1; ``names`` are the caller's words for the two."""
    if too_long not in TOO_LONG:
        raise ValueError(f"{names[1]} is {too_long!r}; expected one of {', '.join(map(repr, TOO_LONG))}")
    if max_len is not None:
        positive_int(names[0], max_len)


@dataclass(frozen=True)
class ChunkPlan:
    """Where each chunk of some documents lies, and what the policy did.

    doc, start, length: (num_chunks,) int64: the document each chunk comes from, its first token in
    that document, and its token count. Chunks are in document order.

    Examples:
        >>> plan = plan_chunks([5, 2], max_len=2, too_long="split")
        >>> plan.doc.tolist(), plan.start.tolist(), plan.length.tolist(), plan.split, plan.dropped_tokens
        ([0, 0, 0, 1], [0, 2, 4, 0], [2, 2, 1, 2], 1, 0)
    """

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    too_long: str
    max_len: int | None
    split: int = 0  # documents cut into several chunks
    truncated: int = 0  # documents cut short
    dropped_tokens: int = 0  # tokens the truncation dropped

    def summary(self) -> str:
        """One line: what the policy did, for a command's output."""
        if self.max_len is None:
            return "no max_len: documents kept whole"
        if self.too_long == "split":
            return f"{self.split:,} documents over max_len {self.max_len} split into {self.split_chunks:,} chunks, no token dropped"
        if self.too_long == "truncate":
            return f"{self.truncated:,} documents over max_len {self.max_len} truncated, {self.dropped_tokens:,} tokens dropped"
        return f"no document over max_len {self.max_len}"

    @property
    def split_chunks(self) -> int:
        """Chunks made from the documents that were split."""
        counts = np.bincount(self.doc)
        return int(counts[counts > 1].sum())


API_FIX = "pass too_long='split' to cut it into chunks (every token kept) or too_long='truncate' to drop its tail"
CLI_FIX = "pass --too-long split to cut it into chunks (every token kept) or --too-long truncate to drop its tail"


def plan_chunks(lengths: Any, max_len: int | None, too_long: str = "error", *,
                name: Any = None, limit: str = "max_len=", fix: str = API_FIX) -> ChunkPlan:
    """The chunks ``too_long`` makes of documents with these lengths.

    For the error of ``too_long="error"``: ``name(i)`` says where document ``i`` is (default
    "document i"), ``limit`` names the limit and ``fix`` the way out, in the caller's words (a
    command line says ``--max-len ``, ``CLI_FIX``).
    """
    check_policy(max_len, too_long)
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_len is None:
        return ChunkPlan(np.arange(len(lengths)), np.zeros(len(lengths), dtype=np.int64), lengths, too_long, None)
    long = lengths > max_len
    if too_long == "error" and long.any():
        i = int(np.flatnonzero(long)[0])
        where = name(i) if name is not None else f"document {i}"
        raise ValueError(
            f"{where} has {int(lengths[i]):,} tokens, over {limit}{max_len} ({int(long.sum()):,} such documents); {fix}"
        )
    chunks = np.maximum(ceil_div(lengths, max_len), 1) if too_long == "split" else np.ones_like(lengths)
    doc = np.repeat(np.arange(len(lengths)), chunks)
    first = np.cumsum(chunks) - chunks
    start = (np.arange(len(doc)) - first[doc]) * max_len  # token offset in the document
    length = np.minimum(lengths[doc] - start, max_len)
    if too_long == "truncate":
        return ChunkPlan(doc, start, length, too_long, max_len, truncated=int(long.sum()),
                         dropped_tokens=int((lengths[long] - max_len).sum()))
    return ChunkPlan(doc, start, length, too_long, max_len, split=int(long.sum()) if too_long == "split" else 0)


def chunk_of(sample: Sample, start: int, length: int) -> Sample:
    """Tokens [start, start + length) of a document, with the document's own targets."""
    return Sample(sample.input_ids[start:start + length], sample.labels[start:start + length])


def chunk_sample(tokens: torch.Tensor, start: int, length: int, *, ignore_index: int = IGNORE_INDEX) -> Any:
    """A chunk of a document given as token ids: the ids themselves when the chunk is the whole
    document, else a :class:`Sample` whose last target is the document's next token (-100 only at
    the document's end)."""
    if start == 0 and length == len(tokens):
        return tokens
    labels = torch.full((length,), ignore_index, dtype=torch.int64)
    nxt = tokens[start + 1:start + length + 1]
    labels[: len(nxt)] = nxt
    return Sample(tokens[start:start + length], labels)


class SplitDocuments(LengthIndexed):
    """A map-style view of ``dataset`` in which no document is longer than ``max_len``.

    ``too_long="split"`` (the default) cuts a long document into consecutive chunks of ``max_len``
    tokens, keeping every token and the document's own targets; ``"truncate"`` keeps its first
    ``max_len`` tokens and counts the rest in ``dropped_tokens``; ``"error"`` refuses it naming the
    document. Short documents pass through unchanged. ``plan.summary()`` says what was done.

    ``lengths`` gives the chunk lengths without loading any sample, for the samplers.

    Examples:
        >>> view = SplitDocuments([[1, 2, 3, 4, 5], [6, 7]], [5, 2], max_len=2)
        >>> view.lengths.tolist(), [view[i].input_ids.tolist() for i in range(len(view))]
        ([2, 2, 1, 2], [[1, 2], [3, 4], [5], [6, 7]])
    """

    def __init__(self, dataset: Any, lengths: Any, *, max_len: int, too_long: str = "split",
                 ignore_index: int = IGNORE_INDEX) -> None:
        positive_int("max_len", max_len)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries but the dataset has {len(dataset)} documents")
        self.dataset, self.max_len, self.too_long, self.ignore_index = dataset, max_len, too_long, ignore_index
        self._stated = lengths
        self.plan = plan_chunks(lengths, max_len, too_long)
        self._lengths = self.plan.length  # (num_chunks,)
        self.num_split, self.num_truncated = self.plan.split, self.plan.truncated
        self.dropped_tokens = self.plan.dropped_tokens

    def __getitem__(self, i: int) -> Sample:
        i = self._index(i)
        doc = int(self.plan.doc[i])
        sample = as_sample(self.dataset[doc], doc, ignore_index=self.ignore_index)
        # The plan was made from the lengths the caller stated; a document of another length would
        # lose tokens past the stated end or yield empty chunks, so it is refused as it is read.
        if len(sample.input_ids) != self._stated[doc]:
            raise ValueError(
                f"document {doc} has {len(sample.input_ids)} tokens but lengths[{doc}] says {int(self._stated[doc])}; "
                "the chunks were planned from lengths: pass the documents' own token counts (after padding is "
                "stripped), e.g. [len(d) for d in dataset]"
            )
        return chunk_of(sample, int(self.plan.start[i]), int(self.plan.length[i]))
