import numpy as np
import pytest
from property import given, settings, st

from packing.report import fit_lengths, padding_report


# Invariant: pad_max's efficiency is the closed form Σ L / (ceil(n / B) · B · max_len).
@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=300), B=st.integers(1, 40))
def test_pad_max_is_the_closed_form(lengths, B):
    r = padding_report(np.array(lengths), max_len=64, batch_size=B, token_budget=128, pad_to_multiple_of=1)
    n = len(lengths)
    assert r.strategy("pad_max").efficiency == pytest.approx(sum(lengths) / (-(-n // B) * B * 64), rel=1e-12)
    assert r.strategy("pad_max").batches == -(-n // B)
    for s in r.strategies:
        assert s.real_tokens == sum(lengths) and 0 < s.efficiency <= 1 and 0 < s.attention_efficiency <= 1
        assert s.padding_fraction == pytest.approx(1 - s.efficiency)


def test_hand_computed_case():
    # lengths 3, 1, 4 with max_len 4, batch 2: pad_max = 8 / (2 * 2 * 4); packs of 4: [4], [3, 1]
    r = padding_report(np.array([3, 1, 4]), max_len=4, batch_size=2, token_budget=4, pad_to_multiple_of=1)
    assert r.strategy("pad_max").efficiency == 8 / 16
    assert r.strategy("pad_max").attention_efficiency == (9 + 1 + 16) / (2 * 2 * 16)
    assert r.strategy("pack").efficiency == 8 / 8 and r.strategy("pack").batches == 2
    assert r.strategy("pack").attention_efficiency == 1.0  # varlen kernels attend within documents
    assert (r.documents, r.real_tokens) == (3, 8)


def test_batch_of_one_padded_to_the_longest_wastes_nothing():
    r = padding_report(np.array([5, 9, 2]), max_len=16, batch_size=1, token_budget=16, pad_to_multiple_of=1)
    assert r.strategy("pad_longest").efficiency == 1.0 and r.strategy("pad_longest").attention_efficiency == 1.0


@pytest.mark.parametrize(
    "mode, kept, counts",
    [("split", [5, 10, 2, 10, 10, 10], {"long_documents": 2, "split_into": 5}),
     ("truncate", [5, 10, 10], {"long_documents": 2, "truncated_tokens": 22}),
     ("error", None, None)],
)
def test_long_documents_are_counted(mode, kept, counts):
    if mode == "error":
        with pytest.raises(ValueError, match=r"document 1 has 12 tokens, over --max-len 10 \(2 such documents\); pass "
                                             r"--too-long split to cut it into chunks \(every token kept\) or --too-long "
                                             r"truncate to drop its tail"):
            fit_lengths(np.array([5, 12, 30]), 10, mode)
        return
    fitted, info = fit_lengths(np.array([5, 12, 30]), 10, mode)
    assert sorted(fitted.tolist()) == sorted(kept)
    for key, value in counts.items():
        assert getattr(info, key) == value
    r = padding_report(np.array([5, 12, 30]), max_len=10, batch_size=2, token_budget=10, too_long=mode,
                       pad_to_multiple_of=1)
    assert (r.documents, r.real_tokens) == (3, 47)  # source documents, before any split
    assert r.strategy("pack").real_tokens == sum(kept)


@pytest.mark.parametrize(
    "lengths, kw, match",
    [([], {}, r"no lengths to report on"),
     ([3, 0], {}, r"document 1 has length 0; lengths must be >= 1"),
     ([3], {"token_budget": 100}, r"--token-budget 100 < --max-len 128 rounded up to --pad-to-multiple-of 64 \(128\)"),
     ([3], {"too_long": "chop"}, r"--too-long is 'chop'; expected one of error, split, truncate")],
)
def test_bad_input(lengths, kw, match):
    args = {**dict(max_len=128, batch_size=4, token_budget=1024), **kw}
    with pytest.raises(ValueError, match=match):
        padding_report(np.array(lengths, dtype=np.int64), **args)
