import numpy as np
import pytest
from property import given, settings, st
import torch
from torch.utils.data import DataLoader

from packing import StreamPacker, SyntheticDocs, get_collator
from packing.sampling.stream import sample_length


# Invariant: every document comes out exactly once, whole, and no pack exceeds the budget.
@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=300), buffer=st.integers(1, 50),
       max_seqs=st.one_of(st.none(), st.integers(1, 5)))
def test_nothing_lost_nothing_over_budget(lengths, buffer, max_seqs):
    docs = [list(range(i, i + n)) for i, n in enumerate(lengths)]
    packs = list(StreamPacker(docs, max_tokens=64, buffer_size=buffer, max_seqs=max_seqs))
    out = sorted(tuple(d) for p in packs for d in p)
    assert out == sorted(tuple(d) for d in docs)
    assert all(1 <= len(p) and sum(map(len, p)) <= 64 for p in packs)
    if max_seqs is not None:
        assert all(len(p) <= max_seqs for p in packs)


def test_seed_distribution_target():
    lengths = SyntheticDocs(20_000, max_len=1024).lengths
    packs = list(StreamPacker(([0] * int(n) for n in lengths), max_tokens=16384, buffer_size=4096))
    assert sum(map(len, packs)) == len(lengths)
    assert lengths.sum() / (16384 * len(packs)) >= 0.985


def test_packs_feed_a_collator_through_a_dataloader():
    docs = SyntheticDocs(40, max_len=128)
    packs = StreamPacker((docs[i] for i in range(len(docs))), max_tokens=512, buffer_size=8)
    loader = DataLoader(packs, batch_size=None, collate_fn=get_collator("concat", total_tokens=512))
    batches = list(loader)
    assert all(b.input_ids.shape == (1, 512) for b in batches)
    assert sum(b.num_tokens for b in batches) == int(docs.lengths.sum())


@pytest.mark.parametrize(
    "doc, match",
    [([], r"document 1 of the stream has length 0; StreamPacker takes 1 to max_tokens=8"),
     (list(range(9)), r"document 1 of the stream has length 9; StreamPacker takes 1 to max_tokens=8 tokens. Split long documents where they "
                           r"enter: ShardStream\(..., max_len=8, too_long='split'\) \(or 'truncate'\)")],
)
def test_bad_documents(doc, match):
    with pytest.raises(ValueError, match=match):
        list(StreamPacker([[1], doc], max_tokens=8))


def test_sample_forms_are_measured_by_their_tokens():
    # A dict by its input_ids, a pair by its inputs, not by the number of keys or items: with a
    # budget of 4, the 4-token pair fills a pack alone, and the 3-token dict cannot share with the
    # 2-token array. Measured by len() of the container, the pair (2) and the dict (1) would share.
    d, pair, arr = {"input_ids": [1, 2, 3]}, (torch.ones(4), torch.ones(4)), np.ones(2, int)
    assert [sample_length(x) for x in (d, pair, arr)] == [3, 4, 2]
    packs = list(StreamPacker([d, pair, arr], max_tokens=4, buffer_size=10))
    assert [[id(x) for x in p] for p in packs] == [[id(pair)], [id(d)], [id(arr)]]


def test_bad_settings():
    with pytest.raises(ValueError, match=r"buffer_size is 0; expected a positive int"):
        StreamPacker([], max_tokens=8, buffer_size=0)


# Invariant: pack_sizes counts exactly the packs StreamPacker makes, from the lengths alone (what lets
# every rank agree on every rank's pack count before reading a token).
@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=200), buffer=st.integers(1, 30),
       max_seqs=st.one_of(st.none(), st.integers(1, 5)))
def test_pack_sizes_predicts_the_packer(lengths, buffer, max_seqs):
    from packing.sampling.stream import pack_sizes

    packs = StreamPacker([[1] * n for n in lengths], max_tokens=64, buffer_size=buffer, max_seqs=max_seqs)
    assert pack_sizes(lengths, max_tokens=64, buffer_size=buffer, max_seqs=max_seqs) == [len(p) for p in packs]
