"""Best-fit decreasing bin packing on the length histogram, fast enough to plan an epoch of 1M documents.

Best-fit decreasing (BFD) places documents longest first, each into the open bin with the least room
that still fits it. Documents of equal length are interchangeable, so the algorithm runs on the
histogram of lengths: its Python loop visits each distinct length (at most ``capacity`` of them) and
moves whole groups of bins between "remaining room" classes, never one document at a time. Documents
are then matched to the planned slots with numpy. Ties between documents of equal length are broken
by ``rng``, so each epoch packs different documents together.

Examples:
    >>> import numpy as np
    >>> bins = best_fit_decreasing(np.array([9, 4, 6, 3, 1, 5]), capacity=10)
    >>> [sorted(np.array([9, 4, 6, 3, 1, 5])[b].tolist()) for b in bins]
    [[1, 9], [4, 6], [3, 5]]
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

from packing.boundaries import ceil_div


def best_fit_decreasing(
    lengths: np.ndarray, capacity: int, *, max_items: int | None = None, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Pack items of the given lengths into bins of ``capacity``.

    lengths: (n,) ints in [1, capacity].
    max_items: at most this many items per bin (None: no limit).
    rng: breaks ties between equal lengths; None keeps index order.
    Returns one int64 array of item indices per bin, bins in the order they were opened (longest
    first).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        i = int(np.argmin(lengths)) if lengths.min() < 1 else int(np.argmax(lengths))
        raise ValueError(f"item {i} has length {int(lengths[i])}; every length must be in [1, capacity={capacity}]")
    per_length = np.bincount(lengths, minlength=capacity + 1)
    room_classes: list[int] = []  # sorted: the remaining room values that have open bins
    bins_with_room: dict[int, list[int]] = {}
    items_in_bin: list[int] = []  # only kept when max_items is set
    slot_bins: list[np.ndarray] = []  # per placement event: the bins that each got one item
    num_bins = 0

    def reopen(bins: list[int], room: int) -> None:
        if max_items is not None:
            bins = [b for b in bins if items_in_bin[b] < max_items]
        if room <= 0 or not bins:
            return
        if room not in bins_with_room:
            bins_with_room[room] = []
            insort(room_classes, room)
        bins_with_room[room].extend(bins)

    for length in np.flatnonzero(per_length)[::-1].tolist():
        count = int(per_length[length])
        while count:
            i = bisect_left(room_classes, length)
            if i < len(room_classes):  # best fit: the smallest room that still holds this length
                room = room_classes[i]
                pool = bins_with_room[room]
                # A bin of this room takes up to room // length of them: after one, its room is
                # smaller still and holds another, so best fit sends the next one there too.
                fits = room // length
                if max_items is None:
                    k = min(ceil_div(count, fits), len(pool))
                    takes = [fits] * k
                else:  # each bin also stops at max_items
                    takes, left = [], count
                    for b in reversed(pool):
                        if not left:
                            break
                        takes.append(min(fits, max_items - items_in_bin[b], left))
                        left -= takes[-1]
                    k = len(takes)
                takes[-1] = min(takes[-1], count - sum(takes[:-1]))
                moved = pool[len(pool) - k :][::-1]  # the order takes was built in
                del pool[len(pool) - k :]
                if not pool:
                    del room_classes[i], bins_with_room[room]
                slot_bins.append(np.repeat(np.asarray(moved), takes))
                by_room: dict[int, list[int]] = {}
                for b, t in zip(moved, takes):
                    if max_items is not None:
                        items_in_bin[b] += t
                    by_room.setdefault(room - t * length, []).append(b)
                for new_room, bins in by_room.items():
                    reopen(bins, new_room)
                count -= sum(takes)
            else:  # nothing fits: open bins, each taking as many of this length as fit
                per_bin = capacity // length if max_items is None else min(capacity // length, max_items)
                full, rest = divmod(count, per_bin)
                new = list(range(num_bins, num_bins + full + (rest > 0)))
                num_bins += len(new)
                slot_bins.append(np.repeat(np.asarray(new), per_bin)[:count])
                if max_items is not None:
                    items_in_bin.extend([per_bin] * full + ([rest] if rest else []))
                reopen(new[:full], capacity - per_bin * length)
                if rest:
                    reopen(new[full:], capacity - rest * length)
                count = 0

    # Slots were filled longest first; give them documents in the same order, ties shuffled.
    order = np.arange(len(lengths)) if rng is None else rng.permutation(len(lengths))
    order = order[np.argsort(_narrow(capacity - lengths[order]), kind="stable")]  # longest first
    bin_of = np.empty(len(lengths), dtype=np.int64)
    bin_of[order] = np.concatenate(slot_bins) if slot_bins else np.empty(0, dtype=np.int64)
    return group_by(bin_of, num_bins)


def _narrow(keys: np.ndarray) -> np.ndarray:
    """Keys as int16 when they fit: numpy's stable sort is a radix sort for 16-bit keys, about 4x
    faster than the merge sort it uses for int64 on 10M lengths."""
    return keys.astype(np.int16) if keys.size and 0 <= keys.min() and keys.max() < 2**15 else keys


def group_by(group_of: np.ndarray, num_groups: int) -> list[np.ndarray]:
    """Indices grouped by ``group_of`` (ints in [0, num_groups)), each group in index order."""
    by_group = np.argsort(group_of, kind="stable")
    ends = np.cumsum(np.bincount(group_of, minlength=num_groups)).tolist()
    return [by_group[s:e] for s, e in zip([0, *ends[:-1]], ends)]  # slicing: np.split is 4x slower here
