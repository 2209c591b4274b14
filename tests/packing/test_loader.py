"""make_loader: a sampler and a collator that disagree about a batch's size are refused, naming both."""

import numpy as np
import pytest

from packing import (ConcatCuSeqlens, LengthBucketSampler, PackingSampler, PadToLongest, PadToMax, SyntheticDocs,
                     make_loader)


def test_bucket_sampler_rounding_below_the_collators_is_refused():
    # The silent case: budget 128, one-token documents, the collator rounding to 64.
    lengths = np.ones(256, dtype=np.int64)
    with pytest.raises(ValueError, match=r"LengthBucketSampler\(pad_to_multiple_of=1\) budgets max_tokens=128 for rows "
                                         r"rounded to 1, but PadToLongest\(pad_to_multiple_of=64\) pads them to a "
                                         r"multiple of 64: a batch could take 8192 slots; give the sampler "
                                         r"pad_to_multiple_of=64"):
        make_loader(lengths, LengthBucketSampler(lengths, max_tokens=128), PadToLongest(64))


def test_agreeing_bucket_loader_keeps_every_batch_within_budget():
    docs = SyntheticDocs(300, max_len=100, seed=1)
    loader = make_loader(docs, LengthBucketSampler(docs.lengths, max_tokens=512, pad_to_multiple_of=64, seed=0),
                         PadToLongest(64))
    slots = [b.num_slots for b in loader]
    assert max(slots) <= 512 and sum(b.num_tokens for b in loader) == int(docs.lengths.sum())


def test_pad_max_with_a_bucket_sampler_needs_rounding_to_max_len():
    lengths = [3, 5, 7]
    with pytest.raises(ValueError, match=r"PadToMax\(max_len=16\) pads every row to 16 slots, but LengthBucketSampler"
                                         r"\(pad_to_multiple_of=1\) budgets max_tokens=32 .*pad_to_multiple_of=16"):
        make_loader(lengths, LengthBucketSampler(lengths, max_tokens=32), PadToMax(16))
    make_loader(lengths, LengthBucketSampler(lengths, max_tokens=32, pad_to_multiple_of=16), PadToMax(16))


def test_packing_sampler_with_a_padded_collator_is_refused():
    with pytest.raises(ValueError, match=r"PackingSampler\(max_tokens=64\) budgets real tokens, but PadToLongest pads "
                                         r"every document of a batch to one width"):
        make_loader([3, 5], PackingSampler([3, 5], max_tokens=64), PadToLongest())


def test_static_packed_collator_limits_are_checked_against_the_sampler():
    lengths = [3, 5, 30]
    with pytest.raises(ValueError, match=r"PackingSampler\(max_tokens=128\) plans batches of more tokens than the "
                                         r"collator's total_tokens=64; give both the same budget"):
        make_loader(lengths, PackingSampler(lengths, max_tokens=128), ConcatCuSeqlens(total_tokens=64))
    with pytest.raises(ValueError, match=r"the collator takes at most max_seqs=4 documents a batch, but "
                                         r"PackingSampler\(max_seqs=None\) may put more in one; give the sampler max_seqs=4"):
        make_loader(lengths, PackingSampler(lengths, max_tokens=64),
                    ConcatCuSeqlens(total_tokens=64, max_seqs=4, max_seqlen=32))
    with pytest.raises(ValueError, match=r"the sampler's longest document has 30 tokens > the collator's max_seqlen=16"):
        make_loader(lengths, PackingSampler(lengths, max_tokens=64, max_seqs=4),
                    ConcatCuSeqlens(total_tokens=64, max_seqs=4, max_seqlen=16))
    with pytest.raises(ValueError, match=r"the sampler has 3 lengths but the dataset has 2 items"):
        make_loader([[1, 2], [3]], PackingSampler(lengths, max_tokens=64), ConcatCuSeqlens())
    loader = make_loader([[1] * n for n in lengths], PackingSampler(lengths, max_tokens=64, max_seqs=4),
                         ConcatCuSeqlens(total_tokens=64, max_seqs=4, max_seqlen=32))
    assert sum(b.num_tokens for b in loader) == 38
