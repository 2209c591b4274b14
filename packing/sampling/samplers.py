"""Batch samplers that control padding waste: pack to a token budget, or bucket by length.

Both are ``batch_sampler``\\ s: they yield lists of dataset indices, one list per step, and plug into
``DataLoader(dataset, batch_sampler=sampler, collate_fn=...)``. Each epoch's plan is a pure function
of (lengths, settings, seed, epoch, num_replicas), so every rank computes the same plan and takes its
own share without communicating.

Examples:
    >>> import numpy as np
    >>> sampler = PackingSampler(np.array([700, 300, 900, 100, 40]), max_tokens=1000, seed=0)
    >>> sorted(sorted(b) for b in sampler)
    [[0, 1], [2, 3], [4]]

Across ranks, every rank gets the same number of batches (so no rank waits in a collective for a
batch that never comes): when the batch count does not divide by ``num_replicas``, the largest
batches are split in two (every document still appears exactly once), or with ``drop_last=True``
the surplus batches are dropped and listed in ``sampler.dropped``. Each step's batches are chosen to
cost about the same on every rank, by tokens or by attention work (``balance="attention"``, Σ L²).

Resuming: ``state_dict()`` records the epoch and how many batches were consumed;
``load_state_dict()`` restores them, and the next iteration starts at the next batch of the same
plan: O(1) to skip, nothing replayed. With ``num_workers > 0`` the DataLoader draws batches ahead of
the training loop, so pass the count the loop actually finished: ``state_dict(consumed=step)``.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler

from packing.boundaries import ceil_div
from packing.data.hf_datasets import is_hf_dataset, lengths_of
from packing.data.indexed import LengthIndexed
from packing.distributed import rank as current_rank
from packing.distributed import world_size
from packing.sampling.binpack import best_fit_decreasing
from packing.validate import positive_int

BALANCES = ("tokens", "attention")


def _validate_lengths(lengths: Any, max_tokens: int) -> np.ndarray:
    if is_hf_dataset(lengths):  # a datasets.Dataset: its lengths from the Arrow columns, no row decoded
        lengths = lengths_of(lengths)
    elif isinstance(lengths, LengthIndexed):  # SplitDocuments, PackedRows, ShardDataset, SyntheticDocs
        lengths = lengths.lengths
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths has shape {arr.shape}; expected a 1-D sequence of document lengths")
    if arr.size == 0:
        raise ValueError("lengths is empty; a sampler needs at least one document")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths has dtype {arr.dtype}; document lengths must be integers")
    arr = arr.astype(np.int64)
    if arr.min() < 1:
        i = int(np.argmin(arr))
        raise ValueError(f"document {i} has length {int(arr[i])}; every document needs >= 1 token")
    if arr.max() > max_tokens:
        i = int(np.argmax(arr))
        raise ValueError(
            f"document {i} has length {int(arr[i])} > max_tokens {max_tokens}; raise max_tokens, or wrap the "
            f"dataset in packing.SplitDocuments(dataset, lengths, max_len={max_tokens}) to split (or truncate) "
            "long documents"
        )
    return arr


def _distributed_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    num_replicas = world_size() if num_replicas is None else num_replicas
    rank = current_rank() if rank is None else rank
    positive_int("num_replicas", num_replicas)
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank is {rank!r}; expected 0 <= rank < num_replicas = {num_replicas}")
    return num_replicas, rank


class _PlannedBatchSampler(Sampler[list[int]]):
    """Shared machinery: epochs, shuffling, rank equalisation and balance, resume. Subclasses plan."""

    def __init__(
        self,
        lengths: Any,
        *,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        balance: str = "tokens",
    ) -> None:
        positive_int("max_tokens", max_tokens, meaning="tokens per batch")
        if balance not in BALANCES:
            raise ValueError(f"balance is {balance!r}; expected one of {BALANCES}")
        self.lengths = _validate_lengths(lengths, max_tokens)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        self.balance = balance
        self.epoch = 0
        self._skip = 0  # batches of this epoch already consumed (set by load_state_dict)
        self._yielded = 0
        self._cache: tuple[int, list[np.ndarray], np.ndarray] | None = None

    # -- what subclasses provide -------------------------------------------------------------
    def _plan(self, rng: np.random.Generator | None) -> list[np.ndarray]:
        """All batches of one epoch, as index arrays, in any order."""
        raise NotImplementedError

    def _cost(self, batch: np.ndarray, kind: str) -> float:
        """What one batch costs, by "tokens" (positions computed) or "attention" (attention work)."""
        raise NotImplementedError

    # -- the epoch plan -------------------------------------------------------------------------
    def _epoch_plan(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(batches in step order, all ranks interleaved; indices dropped this epoch)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, self.epoch, self.num_replicas]) if self.shuffle else None
        batches = self._plan(rng)
        batches, dropped = self._equalise(batches, rng)
        batches = self._order(batches, rng)
        self._cache = (self.epoch, batches, dropped)
        return batches, dropped

    def _equalise(self, batches: list[np.ndarray], rng) -> tuple[list[np.ndarray], np.ndarray]:
        """Make the batch count divisible by num_replicas: drop the surplus, or split the largest."""
        R = self.num_replicas
        surplus = len(batches) % R
        if self.drop_last:
            if len(batches) < R:
                raise ValueError(
                    f"{len(batches)} batches for num_replicas={R} with drop_last=True: every rank would get "
                    "no data; use drop_last=False, more documents, or fewer ranks"
                )
            if not surplus:
                return batches, np.empty(0, dtype=np.int64)
            order = rng.permutation(len(batches)) if rng is not None else np.arange(len(batches))
            drop = set(order[:surplus].tolist())
            kept = [b for i, b in enumerate(batches) if i not in drop]
            return kept, np.sort(np.concatenate([batches[i] for i in drop]))
        if not surplus:
            return batches, np.empty(0, dtype=np.int64)
        need = R - surplus
        splittable = [i for i, b in enumerate(batches) if len(b) >= 2]
        if len(splittable) < need:
            raise ValueError(
                f"{len(self.lengths)} documents make {len(batches)} batches, which cannot be split into a "
                f"multiple of num_replicas={R}: a rank would get no data; use more documents or fewer ranks"
            )
        splittable.sort(key=lambda i: (-self._cost(batches[i], "tokens"), i))
        halves = []
        for i in splittable[:need]:
            b = batches[i][np.argsort(self.lengths[batches[i]], kind="stable")]
            halves += [b[0::2], b[1::2]]  # alternate by length so both halves cost about the same
        split = set(splittable[:need])
        return [b for i, b in enumerate(batches) if i not in split] + halves, np.empty(0, dtype=np.int64)

    def _order(self, batches: list[np.ndarray], rng) -> list[np.ndarray]:
        """Group batches of similar cost into steps of num_replicas, then shuffle the steps."""
        R = self.num_replicas
        if R > 1:
            costs = np.array([self._cost(b, self.balance) for b in batches])
            batches = [batches[i] for i in np.argsort(costs, kind="stable")]
        steps = len(batches) // R
        order = rng.permutation(steps) if rng is not None else np.arange(steps)
        return [batches[s * R + r] for s in order for r in range(R)]

    # -- the Sampler protocol -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Use the plan of ``epoch``: a new order (and new packs) each epoch, the same on every rank."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._skip = 0

    def _mine(self) -> list[np.ndarray]:
        return self._epoch_plan()[0][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._mine()
        start, self._skip = self._skip, 0
        self._yielded = start
        for batch in mine[start:]:
            self._yielded += 1
            yield batch.tolist()

    def __len__(self) -> int:
        """Batches the next iteration yields on this rank: the epoch's, less any consumed before a resume."""
        return len(self._mine()) - self._skip

    def batches(self) -> list[np.ndarray]:
        """This epoch's whole plan, all ranks, in step order (rank r takes every R-th from r)."""
        return list(self._epoch_plan()[0])

    @property
    def dropped(self) -> np.ndarray:
        """Indices left out of this epoch by ``drop_last`` (all ranks), sorted; empty otherwise."""
        return self._epoch_plan()[1]

    def efficiency(self) -> float:
        """Real tokens over positions computed, for this epoch's whole plan (all ranks)."""
        batches = self._epoch_plan()[0]
        real = sum(int(self.lengths[b].sum()) for b in batches)
        return real / sum(self._cost(b, "tokens") for b in batches)

    # -- resume ----------------------------------------------------------------------------------
    @functools.cached_property
    def _fingerprint_values(self) -> dict[str, int]:
        # Once: state_dict() runs at every loader snapshot, and the lengths never change.
        digest = zlib.crc32(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes())
        return {"num_docs": len(self.lengths), "total_tokens": int(self.lengths.sum()), "lengths_crc32": digest}

    def _fingerprint(self) -> dict[str, int]:
        """What identifies the dataset: its size, its tokens, and a digest of every length in order."""
        return self._fingerprint_values

    def _settings(self) -> dict[str, Any]:
        """Every setting that shapes the epoch's plan: resuming under another one would plan other
        batches, so documents would come twice or never. Subclasses add their own."""
        return {"max_tokens": self.max_tokens, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_replicas": self.num_replicas, "rank": self.rank,
                "balance": self.balance}

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this epoch stands, and the settings and dataset it stands in (checked on load).
        ``consumed``: batches the training loop finished (default: yielded)."""
        done = self._yielded if consumed is None else consumed
        return {"epoch": self.epoch, "consumed": done, **self._settings(), **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the batches after the ``consumed`` ones of ``epoch``.
        Refused with a ValueError naming the field when the state was saved under other settings
        or for other lengths."""
        expected = {"epoch", "consumed", *self._settings(), *self._fingerprint()}
        if set(state) != expected:
            unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise ValueError(f"sampler state has unknown keys {unknown} and lacks {missing}; expected {sorted(expected)}")
        for key, value in self._settings().items():
            if state[key] != value:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this {type(self).__name__} has {key}={value!r}; "
                    f"the epoch's plan depends on it (documents would come twice or never): construct it with "
                    f"{key}={state[key]!r} to resume"
                )
        for key, value in self._fingerprint().items():
            if state[key] != value:
                raise ValueError(f"sampler state has {key}={state[key]}, these lengths give {value}: a different dataset")
        self.epoch = state["epoch"]
        total = len(self._mine())
        if not 0 <= state["consumed"] <= total:
            raise ValueError(f"sampler state has consumed={state['consumed']}; epoch {self.epoch} has {total} batches")
        self._skip = state["consumed"]


class PackingSampler(_PlannedBatchSampler):
    """Packs whole documents into batches of at most ``max_tokens`` tokens, for the packed layouts
    (``concat``, ``xformers``, ``flex``).

    Packs are planned with best-fit decreasing (:mod:`packing.sampling.binpack`), which fills the budget
    nearly to the bin lower bound on the seed distribution, then shuffled: batches come
    in random order, and ties between equal lengths are broken at random, so packs differ per epoch.

    Args:
        lengths: (num_docs,) ints, each in [1, max_tokens] (``SyntheticDocs.lengths`` for example), or a
            Hugging Face ``datasets.Dataset`` whose lengths are read from its Arrow columns
            (:mod:`packing.data.hf_datasets`).
        max_tokens: the token budget of one pack.
        max_seqs: at most this many documents per pack (None: no limit).
        **options: ``shuffle``, ``seed``, ``drop_last``, ``num_replicas``, ``rank`` and ``balance``, as
            the module docstring says.
    """

    def __init__(self, lengths: Any, *, max_tokens: int, max_seqs: int | None = None, **options: Any) -> None:
        positive_int("max_seqs", max_seqs, optional=True)
        self.max_seqs = max_seqs
        super().__init__(lengths, max_tokens=max_tokens, **options)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "max_seqs": self.max_seqs}

    def _plan(self, rng):
        return best_fit_decreasing(self.lengths, self.max_tokens, max_items=self.max_seqs, rng=rng)

    def _cost(self, batch: np.ndarray, kind: str) -> float:
        lens = self.lengths[batch]
        return float(lens.sum()) if kind == "tokens" else float((lens * lens).sum())

    def efficiency(self) -> float:
        """Real tokens over ``max_tokens`` x packs: what a row padded to the budget computes."""
        batches = self._epoch_plan()[0]
        return sum(int(self.lengths[b].sum()) for b in batches) / (self.max_tokens * len(batches))


class LengthBucketSampler(_PlannedBatchSampler):
    """Batches of documents of similar length, for the padded layout (``pad_longest``).

    A batch's cost is count x longest (what padding to the longest computes), at most
    ``max_tokens``. Documents are grouped into length buckets (boundaries at quantiles of the
    lengths unless given); each bucket's documents are shuffled and cut into batches of
    ``max_tokens // bucket_max`` documents, so every batch is within budget without looking at its
    contents; then all batches are shuffled together.

    Args:
        lengths: (num_docs,) ints, each in [1, max_tokens], or a ``datasets.Dataset`` (as for
            :class:`PackingSampler`).
        max_tokens: budget per batch, count x longest (rounded up to ``pad_to_multiple_of``).
        max_batch_size: at most this many documents per batch (None: no limit).
        boundaries: sorted bucket upper bounds; the last must be >= the longest document.
        num_buckets: how many quantile buckets to derive when ``boundaries`` is None.
        pad_to_multiple_of: the collator's rounding of the longest length, so the budget holds after
            it (``PadToLongest`` rounds to 64 by default: pass 64 with it).
        **options: ``shuffle``, ``seed``, ``drop_last``, ``num_replicas``, ``rank`` and ``balance``, as
            the module docstring says.
    """

    def __init__(
        self,
        lengths: Any,
        *,
        max_tokens: int,
        max_batch_size: int | None = None,
        boundaries: Any = None,
        num_buckets: int = 64,
        pad_to_multiple_of: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(lengths, max_tokens=max_tokens, **options)
        for name, value in (("max_batch_size", max_batch_size), ("num_buckets", num_buckets),
                            ("pad_to_multiple_of", pad_to_multiple_of)):
            positive_int(name, value, optional=name == "max_batch_size")
        self.max_batch_size = max_batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        if boundaries is None:
            quantiles = np.quantile(self.lengths, np.linspace(0, 1, num_buckets + 1)[1:], method="higher")
            boundaries = np.unique(quantiles.astype(np.int64))
        self.boundaries = np.asarray(boundaries, dtype=np.int64)
        if self.boundaries.ndim != 1 or np.any(np.diff(self.boundaries) <= 0):
            raise ValueError(f"boundaries {self.boundaries.tolist()} must be strictly increasing")
        if self.boundaries[-1] < self.lengths.max():
            raise ValueError(
                f"the last boundary {int(self.boundaries[-1])} is below the longest document "
                f"({int(self.lengths.max())}); add a boundary >= {int(self.lengths.max())}"
            )
        self.batch_sizes = self.max_tokens // self._rounded(self.boundaries)  # per bucket
        if max_batch_size is not None:
            self.batch_sizes = np.minimum(self.batch_sizes, max_batch_size)
        # A table from length to bucket: one gather per document instead of a binary search.
        # int16 while the bucket count fits (a radix sort of small keys), else int32: 32,768 buckets or more.
        key = np.int16 if len(self.boundaries) < 2**15 else np.int32
        self._bucket_of_length = np.searchsorted(self.boundaries, np.arange(self.lengths.max() + 1)).astype(key)
        used = np.unique(self._bucket_of_length[self.lengths])
        if np.any(self.batch_sizes[used] < 1):
            b = int(used[self.batch_sizes[used] < 1][0])
            raise ValueError(
                f"bucket up to length {int(self.boundaries[b])} rounds to {int(self._rounded(self.boundaries[b]))} "
                f"> max_tokens {max_tokens}: not even one document fits; raise max_tokens"
            )

    def _rounded(self, n):
        return ceil_div(n, self.pad_to_multiple_of) * self.pad_to_multiple_of

    def _settings(self) -> dict[str, Any]:
        boundaries = zlib.crc32(np.ascontiguousarray(self.boundaries, dtype=np.int64).tobytes())
        return {**super()._settings(), "max_batch_size": self.max_batch_size,
                "pad_to_multiple_of": self.pad_to_multiple_of, "boundaries_crc32": boundaries}

    def _plan(self, rng):
        order = rng.permutation(len(self.lengths)) if rng is not None else np.arange(len(self.lengths))
        bucket = self._bucket_of_length[self.lengths[order]]  # bucket b holds (bounds[b-1], bounds[b]]
        by_bucket = np.argsort(bucket, kind="stable")  # int16 keys: a radix sort
        order, bucket = order[by_bucket], bucket[by_bucket].astype(np.int64)
        counts = np.bincount(bucket, minlength=len(self.boundaries))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        position = np.arange(len(order)) - starts[bucket]  # rank within its bucket
        per_bucket_batches = ceil_div(counts, np.maximum(self.batch_sizes, 1))
        batch_offset = np.concatenate([[0], np.cumsum(per_bucket_batches)[:-1]])
        batch_id = batch_offset[bucket] + position // self.batch_sizes[bucket]
        cuts = (np.flatnonzero(np.diff(batch_id)) + 1).tolist()
        return [order[s:e] for s, e in zip([0, *cuts], [*cuts, len(order)])]

    def _cost(self, batch: np.ndarray, kind: str) -> float:
        longest = int(self._rounded(self.lengths[batch].max()))
        return float(len(batch) * longest) if kind == "tokens" else float(len(batch) * longest * longest)
