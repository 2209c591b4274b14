"""Rows already packed (DataCollatorWithFlattening, TRL's pack_dataset): each document its own item."""

import pytest
import torch

from packing import PackingSampler, get_collator, make_loader
from packing.data.packed_rows import PackedRows


def flattened_rows():
    # As DataCollatorWithFlattening writes a row: position_ids restart, labels -100 at each start.
    return [{"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1], "labels": [-100, 2, 3, -100, 5]},
            {"input_ids": [6, 7, 8, 9], "position_ids": [0, 0, 1, 2], "labels": [-100, -100, 8, 9]}]


def trl_rows():
    # As TRL's pack_dataset writes a row: seq_lengths, labels unshifted (the prompt masked).
    return [{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [3, 2], "labels": [-100, 2, 3, -100, 5]},
            {"input_ids": [6, 7, 8, 9], "seq_lengths": [1, 3], "labels": [6, -100, 8, 9]}]


@pytest.mark.parametrize("rows", [flattened_rows(), trl_rows()], ids=["position_ids", "seq_lengths"])
def test_each_document_is_an_item_the_sampler_plans_with(rows):
    docs = PackedRows(rows)
    assert docs.lengths.tolist() == [3, 2, 1, 3]
    assert docs[1]["input_ids"] == [4, 5] and "position_ids" not in docs[1] and "seq_lengths" not in docs[1]
    # Budget 4: documents, not rows, are packed; every document exactly once.
    loader = make_loader(docs, PackingSampler(docs, max_tokens=4, seed=0), get_collator("concat"))
    got = sorted(tuple(d.input_ids.tolist()) for b in loader for d in b.split())
    assert got == [(1, 2, 3), (4, 5), (6,), (7, 8, 9)]
    targets = {tuple(d.input_ids.tolist()): d.labels.tolist() for b in loader for d in b.split()}
    assert targets[(1, 2, 3)] == [2, 3, -100] and targets[(7, 8, 9)] == [8, 9, -100]


def test_the_collator_splits_a_packed_row_the_same_way():
    batch = get_collator("concat")(flattened_rows())
    assert list(batch.seq_lens) == [3, 2, 1, 3]
    assert batch.labels[0].tolist() == [2, 3, -100, 5, -100, -100, 8, 9, -100]
    assert torch.equal(batch.cu_seqlens, torch.tensor([0, 3, 5, 6, 9], dtype=torch.int32))


def test_datasets_packed_rows_read_from_arrow():
    datasets = pytest.importorskip("datasets", reason="the dev extra: pip install -e '.[dev]'")
    for rows in (flattened_rows(), trl_rows()):
        ds = datasets.Dataset.from_list(rows)
        docs = PackedRows(ds)
        assert docs.lengths.tolist() == [3, 2, 1, 3] and docs.row.tolist() == [0, 0, 1, 1]
        assert docs[3]["input_ids"] == [7, 8, 9]
        view = PackedRows(ds.select([1, 0]))
        assert view.lengths.tolist() == [1, 3, 3, 2] and view[0]["input_ids"] == [6]


@pytest.mark.parametrize("row, match", [
    ({"input_ids": [1, 2, 3]}, r"row 0 has neither position_ids nor seq_lengths, so it is not a packed row"),
    ({"input_ids": [1, 2, 3], "position_ids": [0, 2, 3]}, r"row 0: position_ids do not count 0, 1, 2, \.\.\."),
    ({"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}, r"row 0: its documents' lengths \[1, 1\] do not add up to its 3"),
    ({"input_ids": [1, 2, 0], "seq_lengths": [2, 1], "attention_mask": [1, 1, 0]},
     r"row 0 of a packed dataset has padding \(attention_mask 0\)"),
], ids=["not-packed", "positions", "lengths", "padding"])
def test_bad_packed_rows_are_named(row, match):
    with pytest.raises(ValueError, match=match):
        PackedRows([row])


def test_rows_that_are_not_dicts_are_refused():
    with pytest.raises(TypeError, match=r"PackedRows takes rows that are dicts with input_ids; row 0 is list"):
        PackedRows([[1, 2, 3]])
