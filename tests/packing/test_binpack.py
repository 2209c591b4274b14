"""best_fit_decreasing, the planner behind PackingSampler, against its definition."""

from bisect import bisect_left, insort

import numpy as np
import pytest
from property import given, settings, st

from packing.sampling.binpack import best_fit_decreasing, group_by


def reference_bfd(lengths: list[int], capacity: int) -> list[int]:
    """Best-fit decreasing one item at a time, by its definition: longest first, each into the open
    bin with the least room that still fits it, else a new bin. Returns the sorted bin loads."""
    rooms: list[int] = []  # sorted remaining room of every bin
    for n in sorted(lengths, reverse=True):
        i = bisect_left(rooms, n)
        if i < len(rooms):
            room = rooms.pop(i) - n
        else:
            room = capacity - n
        insort(rooms, room)
    return sorted(capacity - r for r in rooms)


# Invariant: every index once, no bin over capacity or max_items, and (unlimited) the same bin loads
# as best-fit decreasing run one document at a time: the histogram version is an exact rewrite.
@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=300), capacity=st.integers(40, 100),
       max_items=st.one_of(st.none(), st.integers(1, 6)), seed=st.one_of(st.none(), st.integers(0, 3)))
def test_best_fit_decreasing_is_bfd(lengths, capacity, max_items, seed):
    arr = np.array(lengths)
    rng = None if seed is None else np.random.default_rng(seed)
    bins = best_fit_decreasing(arr, capacity, max_items=max_items, rng=rng)
    placed = np.concatenate(bins)
    assert sorted(placed.tolist()) == list(range(len(lengths)))
    assert all(len(b) >= 1 and arr[b].sum() <= capacity for b in bins)
    if max_items is not None:
        assert all(len(b) <= max_items for b in bins)
    else:
        assert sorted(int(arr[b].sum()) for b in bins) == reference_bfd(lengths, capacity)
    # Bins come longest first: each bin's first-placed (longest) document is no shorter than the next's.
    firsts = [int(arr[b].max()) for b in bins]
    assert firsts == sorted(firsts, reverse=True)


def test_ties_follow_the_rng_and_index_order_without_one():
    lengths = np.array([5, 5, 5, 5, 3, 3])
    plain = best_fit_decreasing(lengths, 8)
    assert [b.tolist() for b in plain] == [[0], [1], [2, 5], [3, 4]]
    shuffled = {tuple(map(tuple, best_fit_decreasing(lengths, 8, rng=np.random.default_rng(s)))) for s in range(8)}
    assert len(shuffled) > 1  # the same loads, other documents together


def test_group_by_keeps_index_order_and_empty_groups():
    assert [g.tolist() for g in group_by(np.array([2, 0, 2, 1]), 4)] == [[1], [3], [0, 2], []]


@pytest.mark.parametrize("lengths, message", [([3, 12], r"item 1 has length 12; every length must be in \[1, capacity=10\]"),
                                              ([0, 3], r"item 0 has length 0; every length must be in \[1, capacity=10\]")])
def test_a_length_that_cannot_be_placed_is_refused(lengths, message):
    with pytest.raises(ValueError, match=message):
        best_fit_decreasing(np.array(lengths), 10)
