"""The boundary arithmetic every layout, kernel and mask shares (packing.boundaries)."""

import numpy as np
import pytest
from property import given, settings, st
import torch

from packing.boundaries import (
    block_causal_mask,
    block_lengths,
    ceil_div,
    cumulative_lengths,
    packed_positions,
    round_up,
    static_boundaries,
    static_length,
    with_tail,
)
from packing.validate import positive_int


def test_ceil_div_and_round_up_on_ints_and_arrays():
    assert [ceil_div(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert ceil_div(np.array([0, 1, 4, 5]), 4).tolist() == [0, 1, 1, 2]
    assert (round_up(5, 4), round_up(8, 4), round_up(5, None)) == (8, 8, 5)


# Invariant: the tail rule reads the same on the host (block_lengths) and on the device (with_tail),
# and the mask it implies lets no real token see another document or the tail.
@settings(max_examples=100, deadline=None)
@given(lens=st.lists(st.integers(1, 9), min_size=1, max_size=6), tail=st.integers(0, 7), causal=st.booleans())
def test_the_padding_tail_is_one_more_block(lens, tail, causal):
    n = sum(lens)
    slots = n + tail
    blocks = block_lengths(lens, slots)
    assert blocks == (lens + [tail] if tail else lens)
    cu = with_tail(cumulative_lengths(lens), n, slots)
    assert cu.tolist() == cumulative_lengths(blocks).tolist()
    mask = block_causal_mask(cumulative_lengths(lens), slots, causal=causal)
    doc = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))
    i = torch.arange(slots)
    expected = (doc[:, None] == doc[None, :]) & ((i[:, None] >= i[None, :]) if causal else True)
    assert torch.equal(mask, expected)
    assert packed_positions(lens).tolist() == [p for L in lens for p in range(L)]


def test_static_boundaries_cut_the_tail_and_refuse_too_many():
    cu = static_boundaries([2, 3], num_slots=12, length=static_length(3, 12, 3), max_seqlen=3)
    assert cu.tolist() == [0, 2, 5, 8, 11, 12, 12, 12]  # the 7-slot tail as 3 + 3 + 1, then empty ones
    assert cu.dtype == torch.int32 and static_length(3, 12, 3) == 3 + 4 + 1
    with pytest.raises(ValueError, match=r"2 sequences and a padding tail of 7 slots need 6 boundaries > the static length 5"):
        static_boundaries([2, 3], num_slots=12, length=5, max_seqlen=3)


@pytest.mark.parametrize("value, optional, message", [
    (0, False, "max_tokens is 0; expected a positive int"),
    (True, False, "max_tokens is True; expected a positive int"),
    (2.0, False, "max_tokens is 2.0; expected a positive int"),
    (None, False, "max_tokens is None; expected a positive int"),
    (-1, True, "max_tokens is -1; expected a positive int or None"),
])
def test_positive_int_names_the_value_and_the_expectation(value, optional, message):
    with pytest.raises(ValueError, match=message):
        positive_int("max_tokens", value, optional=optional)
    positive_int("max_tokens", 3)
    positive_int("max_tokens", None, optional=True)
