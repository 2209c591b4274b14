import pickle

import numpy as np
import pytest
from property import given, settings, st
import torch
from torch.utils.data import DataLoader

from equivalence import collator, random_docs
from packing import COLLATORS, SyntheticDocs, as_sample, get_collator


def random_samples(lens, seed=0):
    return random_docs(lens, vocab_size=1000, seed=seed, low=0)


@pytest.mark.parametrize("name", list(COLLATORS))
@pytest.mark.parametrize("form", ["ids", "dict", "pair"])
def test_round_trip_returns_the_samples(name, form):
    ids = random_samples([5, 1, 17, 9])
    if form == "ids":
        samples = ids
    elif form == "dict":
        samples = [{"input_ids": s.numpy(), "targets": torch.roll(s, -1)} for s in ids]
    else:
        samples = [(s.tolist(), torch.roll(s, -1).tolist()) for s in ids]
    batch = collator(name)(samples)
    assert batch.layout == COLLATORS[name].layout
    expected = [as_sample(s) for s in samples]
    got = batch.split()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g.input_ids, e.input_ids) and torch.equal(g.labels, e.labels)


@pytest.mark.parametrize(
    "name, slots",
    [("pad_max", 4 * 64), ("pad_longest", 4 * 64), ("nested", 32), ("concat", 32), ("xformers", 32)],
)
def test_slots_and_padding(name, slots):
    batch = collator(name)(random_samples([5, 1, 17, 9]))
    assert (batch.num_tokens, batch.num_slots, batch.max_seqlen) == (32, slots, 17)
    assert batch.num_targets == 32 - 4  # the last token of each document predicts nothing


def test_pad_longest_rounds_up_and_exact():
    samples = random_samples([5, 70])
    assert collator("pad_longest")(samples).input_ids.shape == (2, 128)
    assert collator("pad_longest", pad_to_multiple_of=None)(samples).input_ids.shape == (2, 70)


@pytest.mark.parametrize("name", ["concat", "xformers"])
def test_static_row_length(name):
    samples = random_samples([5, 1, 17])
    assert collator(name, total_tokens=32)(samples).input_ids.shape == (1, 32)
    assert collator(name, pad_to_multiple_of=8)(samples).input_ids.shape == (1, 24)
    with pytest.raises(ValueError, match=r"batch has 23 tokens > total_tokens 16; raise total_tokens"):
        collator(name, total_tokens=16)(samples)


@pytest.mark.parametrize("name", list(COLLATORS))
def test_empty_batch(name):
    with pytest.raises(ValueError, match=r"got an empty batch \(0 samples\); pass at least one sample"):
        collator(name)([])


@pytest.mark.parametrize("name", list(COLLATORS))
def test_bad_sample_is_named_by_position(name):
    with pytest.raises(ValueError, match=r"sample 2 has length 0"):
        collator(name)([[1, 2], [3], []])
    with pytest.raises(TypeError, match=r"sample 1: input_ids has dtype torch.float32"):
        collator(name)([[1, 2], torch.tensor([0.5])])


def test_pad_max_rejects_long_sample_instead_of_truncating():
    with pytest.raises(ValueError, match=r"sample 1 has length 65 > max_len 64; raise max_len or split"):
        collator("pad_max")(random_samples([3, 65]))


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("pad_max", {"max_len": 0}, r"max_len is 0; expected a positive int"),
        ("pad_longest", {"pad_to_multiple_of": 0}, r"pad_to_multiple_of is 0"),
        ("concat", {"total_tokens": -5}, r"total_tokens is -5"),
        ("concat", {"total_tokens": 64, "pad_to_multiple_of": 8}, r"both set; choose one"),
        ("nested", {"pad_id": -1}, r"pad_id is -1; expected an int >= 0"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_collator(name, **options)


def test_unknown_collator_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown collator 'padded'; known collators: pad_max, pad_longest, nested, concat, xformers"):
        get_collator("padded")


def test_xformers_missing_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xformers.ops.fmha.attn_bias", None)  # import now fails
    monkeypatch.setitem(sys.modules, "mslk.attention.fmha.attn_bias", None)
    with pytest.raises(ImportError, match=r"pip install 'varlen-packing\[xformers\]'"):
        get_collator("xformers")


@pytest.mark.parametrize("name", list(COLLATORS))
def test_collator_pickles(name):
    c = collator(name, pad_id=3)
    c2 = pickle.loads(pickle.dumps(c))
    assert type(c2) is type(c) and vars(c2) == vars(c)


@pytest.mark.parametrize("name", list(COLLATORS))
def test_dataloader_workers_give_the_same_batches(name):
    docs = SyntheticDocs(12, max_len=64, seed=1)
    def load(workers):
        loader = DataLoader(docs, batch_size=4, collate_fn=collator(name), num_workers=workers)
        return [b.split() for b in loader]
    serial, parallel = load(0), load(2)
    assert len(serial) == 3
    for bs, bp in zip(serial, parallel):
        for s, p in zip(bs, bp):
            assert torch.equal(s.input_ids, p.input_ids) and torch.equal(s.labels, p.labels)


# Invariant: for any lengths >= 1, every collator keeps every token and label exactly once, in order,
# restarts positions per sequence, and puts only the pad id / ignore index into padding slots.
@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=8), name=st.sampled_from(list(COLLATORS)))
def test_collation_keeps_every_token(lens, name):
    samples = random_samples(lens, seed=sum(lens))
    batch = collator(name, pad_id=7)(samples)
    assert batch.seq_lens == tuple(lens) and batch.num_tokens == sum(lens)
    assert batch.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
    for s, got in zip(samples, batch.split()):
        assert torch.equal(got.input_ids, s)
    positions = batch.per_sequence(batch.position_ids)
    assert all(torch.equal(p, torch.arange(n)) for p, n in zip(positions, lens))
    if batch.layout != "nested":
        # attention_mask was checked against seq_lens at construction; the packed row pads its tail.
        real = batch.attention_mask if batch.layout == "padded" else torch.arange(batch.num_slots)[None] < sum(lens)
        assert bool((batch.input_ids[~real] == 7).all()) and bool((batch.labels[~real] == -100).all())
        assert batch.num_slots == batch.input_ids.numel()


def test_xformers_mask_is_built_on_the_host_even_when_cuda_exists(monkeypatch):
    # xFormers' from_seqlens defaults to CUDA when it is available; the collator must not follow.
    c = collator("xformers")  # imports xFormers first, which probes CUDA at import time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    batch = c(random_samples([3, 4]))
    assert batch.attn_bias.q_seqinfo.seqstart.device.type == "cpu"


@pytest.mark.parametrize("name", ["concat", "xformers"])
def test_static_shapes_fix_every_kernel_argument(name):
    # Whatever the documents, a static collator gives one row length, one boundary length and one
    # max_seqlen; the boundaries start with cu_seqlens and cut the tail into blocks <= max_seqlen.
    c = collator(name, total_tokens=64, max_seqs=6, max_seqlen=20)
    assert c.static_length == 6 + 4 + 1
    for lens in ([5, 1, 17], [20], [20, 20, 20, 4], [1, 1, 1, 1, 1, 1]):
        b = c(random_samples(lens))
        cu = b.static_cu_seqlens
        assert b.input_ids.shape == (1, 64) and cu.shape == (11,) and b.static_max_seqlen == 20
        assert cu[: len(lens) + 1].tolist() == b.cu_seqlens.tolist() and cu[-1] == 64
        blocks = cu.diff()
        assert (blocks >= 0).all() and (blocks <= 20).all()


def test_static_boundaries_bounds():
    from packing.batch import static_boundaries

    assert static_boundaries([2, 3], 12, 7, 3).tolist() == [0, 2, 5, 8, 11, 12, 12]
    with pytest.raises(ValueError, match=r"2 sequences and a padding tail of 7 slots need 6 boundaries > the "
                                         r"static length 5; raise max_seqs"):
        static_boundaries([2, 3], 12, 5, 3)


def test_static_shapes_refuse_what_does_not_fit():
    c = collator("concat", total_tokens=64, max_seqs=2, max_seqlen=16)
    with pytest.raises(ValueError, match=r"batch has 3 sequences > max_seqs 2; raise max_seqs or cap the sampler's "
                                         r"documents per batch \(PackingSampler\(max_seqs=...\)\)"):
        c(random_samples([1, 2, 3]))
    with pytest.raises(ValueError, match=r"batch holds a sequence of length 17 > max_seqlen 16; raise max_seqlen or split"):
        c(random_samples([17]))
    for options in ({"max_seqs": 4, "max_seqlen": 16}, {"total_tokens": 64, "max_seqs": 4}):
        with pytest.raises(ValueError, match=r"static shapes need all three"):
            collator("concat", **options)


def test_get_collator_names_a_missing_or_unknown_option():
    # Python's raw "missing 1 required positional argument" named neither get_collator nor the fix.
    with pytest.raises(TypeError, match=r"get_collator\('pad_max'\) needs the option max_len=\.\.\.; e\.g\. "
                                        r"get_collator\('pad_max', max_len=1024\): the fixed row length"):
        get_collator("pad_max")
    with pytest.raises(TypeError, match=r"get_collator\('concat'\) takes no option 'max_len'; its options: "):
        get_collator("concat", max_len=8)


def test_ignore_keys_as_a_string_is_refused():
    # A bare string would be read as its characters: 'text' as 't', 'e', 'x', 't'.
    with pytest.raises(TypeError, match=r"ignore_keys takes a sequence of key names, got the string 'token_type_ids'; "
                                         r"write \['token_type_ids'\]"):
        get_collator("concat", ignore_keys="token_type_ids")
