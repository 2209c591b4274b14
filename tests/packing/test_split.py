import pytest
from property import given, settings, st
import torch

from packing import PackingSampler, SplitDocuments, as_sample


# Invariant: splitting keeps every token and target of every document, in order, in chunks <= max_len.
@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=20), max_len=st.integers(1, 20))
def test_split_keeps_every_token(lengths, max_len):
    docs = [torch.arange(1, n + 1) * 10 + i for i, n in enumerate(lengths)]
    view = SplitDocuments(docs, lengths, max_len=max_len)
    assert len(view) == len(view.lengths) and int(view.lengths.max()) <= max_len
    rebuilt = torch.cat([view[i].input_ids for i in range(len(view))])
    assert torch.equal(rebuilt, torch.cat(docs))
    labels = torch.cat([view[i].labels for i in range(len(view))])
    assert torch.equal(labels, torch.cat([as_sample(d).labels for d in docs]))
    assert [len(view[i].input_ids) for i in range(len(view))] == view.lengths.tolist()


def test_truncate_counts_what_it_drops():
    view = SplitDocuments([[1, 2, 3, 4, 5], [6]], [5, 1], max_len=2, too_long="truncate")
    assert view.lengths.tolist() == [2, 1] and view[0].input_ids.tolist() == [1, 2]
    assert (view.num_truncated, view.dropped_tokens) == (1, 3)


def test_split_makes_long_documents_packable():
    lengths = [30, 5, 12]
    view = SplitDocuments([[1] * n for n in lengths], lengths, max_len=10)
    assert view.num_split == 2 and sum(view.lengths) == 47
    assert sum(len(b) for b in PackingSampler(view.lengths, max_tokens=10)) == len(view)


@pytest.mark.parametrize(
    "kw, match",
    [({"max_len": 0}, r"max_len is 0"),
     ({"max_len": 4, "too_long": "chop"}, r"too_long is 'chop'; expected one of 'error', 'split', 'truncate'"),
     ({"max_len": 2, "too_long": "error"}, r"document 0 has 3 tokens, over max_len=2 \(1 such documents\); pass "
                                           r"too_long='split' to cut it into chunks \(every token kept\) or too_long='truncate'"),
     ({"max_len": 4, "lengths": [3]}, r"lengths has 1 entries but the dataset has 2 documents")],
)
def test_bad_settings(kw, match):
    kw = {"lengths": [3, 2], **kw}
    with pytest.raises(ValueError, match=match):
        SplitDocuments([[1, 2, 3], [4, 5]], **kw)


def test_truncate_keeps_the_real_target_of_the_last_kept_token_and_summaries():
    view = SplitDocuments([[1, 2, 3, 4, 5], [6]], [5, 1], max_len=2, too_long="truncate")
    assert view[0].labels.tolist() == [2, 3]  # token 2 still predicts 3: only inputs are cut
    assert view.plan.summary() == "1 documents over max_len 2 truncated, 3 tokens dropped"
    split = SplitDocuments([[1, 2, 3, 4, 5], [6]], [5, 1], max_len=2)
    assert split.plan.summary() == "1 documents over max_len 2 split into 3 chunks, no token dropped"


def test_mode_keyword_is_gone_not_ignored():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'mode'"):
        SplitDocuments([[1, 2, 3]], [3], max_len=2, mode="truncate")


@pytest.mark.parametrize("stated, found", [(3, 10), (12, 10)], ids=["short", "long"])
def test_wrong_stated_lengths_are_refused_as_read(stated, found):
    # A wrong length would drop the tokens past it (or make empty chunks) without a word.
    view = SplitDocuments([list(range(1, found + 1)), [1, 2]], [stated, 2], max_len=4)
    with pytest.raises(ValueError, match=rf"document 0 has {found} tokens but lengths\[0\] says {stated}; the chunks "
                                         r"were planned from lengths"):
        view[0]
    assert view[len(view) - 1].input_ids.tolist() == [1, 2]  # a right length reads as before
