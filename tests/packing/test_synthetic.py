import pytest
import torch

from packing import SyntheticDocs


def test_seed_distribution_and_determinism():
    docs = SyntheticDocs(2000, max_len=1024, vocab_size=1024, seed=5)
    assert docs.lengths.min() >= 1 and docs.lengths.max() <= 1023
    assert 480 < docs.lengths.mean() < 545  # uniform in [1, 1023] has mean 512
    inputs, targets = docs[7]
    assert len(inputs) == len(targets) == docs.lengths[7]
    assert torch.equal(inputs[1:], targets[:-1])
    assert int(inputs.min()) >= 1 and int(inputs.max()) <= 1023
    again = SyntheticDocs(2000, max_len=1024, vocab_size=1024, seed=5)
    assert torch.equal(again[7][0], inputs) and (again.lengths == docs.lengths).all()
    assert not torch.equal(SyntheticDocs(2000, seed=6)[7][0][:5], inputs[:5])


def test_index_out_of_range():
    with pytest.raises(IndexError, match=r"document 3 out of range for 3 documents"):
        SyntheticDocs(3)[3]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_docs": 0}, r"num_docs is 0"), ({"num_docs": 1, "max_len": 1}, r"max_len is 1"),
     ({"num_docs": 1, "vocab_size": 1}, r"vocab_size is 1")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticDocs(**kwargs)
