"""Hugging Face datasets into the samplers and collators: lengths from Arrow, rows in their conventions."""

import io

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets", reason="the dev extra: pip install -e '.[dev]'")

from packing import LengthBucketSampler, PackingSampler, PadToLongest, get_collator, make_loader  # noqa: E402
from packing.data.hf_datasets import lengths_of  # noqa: E402


def padded_rows(lengths, width=12, side="right"):
    """A tokenizer's padded output: ids 1.. then 0s, its attention_mask, and labels -100 on the padding."""
    ids, masks = [], []
    for i, n in enumerate(lengths):
        real, pad = [10 * i + k + 1 for k in range(n)], [0] * (width - n)
        ids.append(real + pad if side == "right" else pad + real)
        masks.append([1] * n + [0] * (width - n) if side == "right" else [0] * (width - n) + [1] * n)
    labels = [[t if m else -100 for t, m in zip(r, mk)] for r, mk in zip(ids, masks)]
    return {"input_ids": ids, "attention_mask": masks, "labels": labels}


@pytest.mark.parametrize("side", ["right", "left"])
def test_lengths_come_from_the_arrow_columns_through_disk_and_views(tmp_path, side):
    lengths = [3, 12, 1, 7, 5]
    ds = datasets.Dataset.from_dict(padded_rows(lengths, side=side))
    ds.save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))  # memory-mapped, as a real one is
    assert lengths_of(ds).tolist() == lengths
    view = ds.shuffle(seed=0).select([4, 0, 2])  # the indices mapping, followed
    assert lengths_of(view).tolist() == [sum(r) for r in view["attention_mask"]]
    unpadded = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5, 6]]})
    assert lengths_of(unpadded).tolist() == [2, 4]
    holes = datasets.Dataset.from_dict({"input_ids": [[1], [], [1, 2, 3], [], [4, 4]],
                                        "attention_mask": [[1], [], [1, 1, 0], [], [0, 1]]})
    assert lengths_of(holes).tolist() == [1, 0, 2, 0, 1]  # empty rows between filled ones


def test_a_dataset_goes_straight_into_both_samplers_and_collates_to_the_right_targets():
    lengths = [3, 12, 1, 7, 5, 9, 2, 4]
    ds = datasets.Dataset.from_dict(padded_rows(lengths, side="left"))
    sampler = PackingSampler(ds, max_tokens=16, seed=0)
    assert sampler.lengths.tolist() == lengths
    loader = make_loader(ds, sampler, get_collator("concat"))
    docs = [d for batch in loader for d in batch.split()]
    assert sorted(len(d.input_ids) for d in docs) == sorted(lengths)
    for d in docs:  # every document's own tokens and next-token targets; no pad token is a target
        first = int(d.input_ids[0])
        assert d.input_ids.tolist() == list(range(first, first + len(d.input_ids)))
        assert d.labels.tolist() == d.input_ids.tolist()[1:] + [-100]
    bucket = LengthBucketSampler(ds, max_tokens=64, pad_to_multiple_of=8, seed=0)
    assert max(b.num_slots for b in make_loader(ds, bucket, PadToLongest(8))) <= 64


def test_lengths_refuse_a_dataset_without_token_ids():
    with pytest.raises(ValueError, match=r"the dataset has columns \['text'\]; the samplers need 'input_ids'"):
        PackingSampler(datasets.Dataset.from_dict({"text": ["a", "b"]}), max_tokens=8)
    with pytest.raises(TypeError, match=r"lengths_of takes a datasets.Dataset, got list"):
        lengths_of([[1, 2]])


def test_a_padding_only_row_is_named_by_the_sampler():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [0, 0]], "attention_mask": [[1, 1], [0, 0]]})
    with pytest.raises(ValueError, match=r"document 1 has length 0; every document needs >= 1 token"):
        PackingSampler(ds, max_tokens=8)


def test_ten_thousand_rows_read_without_decoding_a_row(monkeypatch):
    # Decoding a row goes through the dataset's __getitem__; lengths_of must not call it.
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(1, 1 + n % 17 + 1)) for n in range(10_000)]})
    monkeypatch.setattr(type(ds), "__getitem__", lambda *a: pytest.fail("a row was decoded"))
    assert np.array_equal(lengths_of(ds), np.arange(10_000) % 17 + 1)


def test_transformers_tokenizer_rows_collate_prompt_masked():
    # Prompt masked with -100 in transformers' unshifted labels: only the completion is learned.
    ds = datasets.Dataset.from_dict({"input_ids": [[7, 8, 9, 10, 0]], "attention_mask": [[1, 1, 1, 1, 0]],
                                     "labels": [[-100, -100, 9, 10, -100]]})
    batch = get_collator("concat")(list(ds))
    assert batch.input_ids.tolist() == [[7, 8, 9, 10]]
    assert batch.labels.tolist() == [[-100, 9, 10, -100]]
    assert torch.equal(batch.cu_seqlens, torch.tensor([0, 4], dtype=torch.int32))


# -- a datasets.IterableDataset streamed into StreamPacker, resumed exactly ------------------------

def iterable_rows(n=60, shards=4):
    g = np.random.default_rng(0)
    lengths = g.integers(1, 30, n)
    rows = padded_rows(lengths.tolist(), width=32, side="left")
    return datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=shards), lengths


def packs_of(loader):
    return [[tuple(r["input_ids"]) for r in pack] for pack in loader]


@pytest.mark.parametrize("stop", [1, 4, 9])
def test_iterable_dataset_resumes_to_the_same_packs(stop):
    from packing import StreamPacker
    from packing.data.hf_stream import HFStream

    def packer(snapshot_every=5):
        ds, _ = iterable_rows()
        return StreamPacker(HFStream(ds, snapshot_every=snapshot_every), max_tokens=48, buffer_size=8)

    whole = packs_of(packer())
    first = packer()
    it = iter(first)
    head = [[tuple(r["input_ids"]) for r in next(it)] for _ in range(stop)]
    state = first.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as a checkpoint holds it: tensors and plain values only
    buffer.seek(0)
    resumed = packer()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + packs_of(resumed) == whole
    # Every row once: none lost, none twice.
    assert sorted(r for p in whole for r in p) == sorted(tuple(r["input_ids"]) for r in iterable_rows()[0])
    with pytest.raises(ValueError, match=r"HFStream state was saved with snapshot_every=5, this stream has "
                                         r"snapshot_every=7: construct it with snapshot_every=5 to resume"):
        packer(snapshot_every=7).load_state_dict(state)


def test_iterable_dataset_through_a_stateful_loader_with_workers():
    from torchdata.stateful_dataloader import StatefulDataLoader

    from packing import ConcatCuSeqlens, StreamPacker
    from packing.data.hf_stream import HFStream

    def loader():
        ds, _ = iterable_rows(n=80)
        packs = StreamPacker(HFStream(ds, snapshot_every=4), max_tokens=48, buffer_size=8)
        return StatefulDataLoader(packs, batch_size=None, num_workers=2, collate_fn=ConcatCuSeqlens())

    whole = [b.input_ids[0].tolist() for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it).input_ids[0].tolist() for _ in range(3)]
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + [b.input_ids[0].tolist() for b in resumed] == whole


def test_iterable_dataset_refusals():
    from packing.data.hf_stream import HFStream

    ds, _ = iterable_rows()
    with pytest.raises(ValueError, match=r"HFStream: this IterableDataset is shuffled with a buffer \(shuffle\(buffer_size="
                                         r"\.\.\.\)\), whose contents datasets does not save"):
        HFStream(ds.shuffle(seed=0, buffer_size=4))
    with pytest.raises(TypeError, match=r"HFStream takes a datasets.IterableDataset \(datasets >= 2.18\), got list"):
        HFStream([[1, 2]])
    other = datasets.Dataset.from_dict({"input_ids": [[9, 9]] * 4}).to_iterable_dataset(num_shards=2)
    with pytest.raises(ValueError, match=r"HFStream state was saved with fingerprint='shards=4 crc=\d+', this stream has "
                                         r"fingerprint='shards=2 crc=\d+': another dataset"):
        HFStream(other).load_state_dict(HFStream(ds).state_dict())
    with pytest.raises(ValueError, match=r"HFStream over 2 ranks: a rank cannot count another rank's rows"):
        HFStream(ds).share_lengths(0, 0, 2, 1)
