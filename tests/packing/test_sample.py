import numpy as np
import pytest
import torch

from packing.sample import Sample, as_sample, as_samples


@pytest.mark.parametrize(
    "obj",
    [torch.tensor([5, 6, 7]), [5, 6, 7], np.array([5, 6, 7], dtype=np.int32), {"input_ids": [5, 6, 7]}],
    ids=["tensor", "list", "ndarray", "dict"],
)
def test_ids_alone_get_shifted_targets(obj):
    s = as_sample(obj)
    assert s.input_ids.tolist() == [5, 6, 7]
    assert s.labels.tolist() == [6, 7, -100]
    assert s.input_ids.dtype == s.labels.dtype == torch.int64


def test_pair_and_dict_targets_are_aligned_targets():
    assert as_sample(([5, 6, 7], [6, 7, 8])).labels.tolist() == [6, 7, 8]
    s = as_sample({"input_ids": torch.tensor([5, 6]), "targets": torch.tensor([-100, 9])})
    assert s == Sample(s.input_ids, s.labels) and s.labels.tolist() == [-100, 9]


def test_custom_ignore_index():
    assert as_sample([1, 2], ignore_index=-1).labels.tolist() == [2, -1]


def test_length_one_sample_has_no_target():
    assert as_sample([4]).labels.tolist() == [-100]


@pytest.mark.parametrize(
    "obj, exc, match",
    [
        ([], ValueError, r"sample 3 has length 0; .*Filter out empty documents"),
        (torch.zeros(2, 5, dtype=torch.long), ValueError, r"sample 3: input_ids has shape \(2, 5\); expected 1-D"),
        (torch.tensor([1.0, 2.0]), TypeError, r"sample 3: input_ids has dtype torch.float32; .*cast with .long\(\)"),
        ([1, 2.5], TypeError, r"sample 3: input_ids holds 2.5 of type float"),
        (np.array([1.0, 2.0]), TypeError, r"dtype torch.float64; token ids must be integers"),
        ([3, -2, 1], ValueError, r"sample 3 has negative token id -2 \(first at position 1\)"),
        (([1, 2], [3]), ValueError, r"targets have length 1 but inputs have length 2"),
        (([1, 2], [3, -5]), ValueError, r"label -5 at position 1; labels must be >= 0 or the ignore index -100"),
        ({"text": "hi"}, ValueError, r"dict has keys \['text'\]; expected 'input_ids'"),
        ({"input_ids": [10, 11, 12, 13, 14], "labels": [11, 12, 13, 14, -100]}, ValueError,
         r"sample 3: its 'labels' look pre-shifted \(every learned label is the next input id, not its own\); 'labels' "
         r"means transformers' unshifted labels. Put next-token targets under 'targets' instead"),
        ({"input_ids": [1, 2], "labels": [1, 2], "targets": [2, -100]}, ValueError,
         r"sample 3 has both 'labels' \(transformers' unshifted labels\) and 'targets' \(next-token targets\); give one"),
        ({"input_ids": [5, 6, 0, 7], "attention_mask": [1, 1, 0, 1]}, ValueError,
         r"sample 3: attention_mask is 0 at position 2, between tokens at 0 and 3; only left or right padding"),
        ({"input_ids": [0, 0], "attention_mask": [0, 0]}, ValueError, r"sample 3: attention_mask is all 0 \(2 positions\)"),
        ({"input_ids": [5, 6], "attention_mask": [1, 2]}, ValueError, r"sample 3: attention_mask holds 2; expected 0 and 1"),
        ({"input_ids": [5, 6, 7], "attention_mask": [1, 1]}, ValueError,
         r"sample 3: attention_mask has length 2 but input_ids has length 3; every per-token key must be aligned"),
        ({"input_ids": [5, 6, 7], "targets": [6, 7, -100], "completion_mask": [0, 1, 1]}, ValueError,
         r"sample 3 has 'completion_mask' with 'targets': pre-shifted targets already say what is learned"),
        ({"input_ids": [5, 6, 7], "position_ids": [0, 2, 3]}, ValueError,
         r"sample 3: position_ids is 2 at position 1 after 0; packing reads position_ids only as document boundaries"),
        ({"input_ids": [5, 6, 7], "position_ids": [1, 2, 3]}, ValueError, r"sample 3: position_ids is 1 at position 0;"),
        ({"input_ids": [5, 6, 7], "seq_lengths": [2, 2]}, ValueError,
         r"sample 3: seq_lengths \[2, 2\] \(sum 4\) must be lengths >= 1 that add up to the row's 3 tokens"),
        ({"input_ids": [5, 6, 7], "seq_lengths": [1, 2], "position_ids": [0, 1, 0]}, ValueError,
         r"sample 3: seq_lengths \[1, 2\] and position_ids \(documents of \[2, 1\]\) disagree"),
        ({"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 0]}, ValueError,
         r"sample 3: key 'token_type_ids' holds a sequence packing does not read .*drop the column "
         r"\(dataset.remove_columns\(\['token_type_ids'\]\)\), or pass ignore_keys=\['token_type_ids'\]"),
        ({"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]}, ValueError,
         r"sample 3 is a packed row of 2 documents .*as_sample takes one document: use packing.sample.as_samples"),
        ("hello", TypeError, r"sample 3: input_ids is a str; expected a 1-D integer tensor"),
        (torch.tensor([True, False]), TypeError, r"dtype torch.bool"),
    ],
    ids=["empty", "2d", "float-tensor", "float-list", "float-ndarray", "negative", "length-mismatch",
         "bad-label", "dict-without-ids", "preshifted-labels", "labels-and-targets", "mask-hole", "mask-all-zero",
         "mask-not-binary", "mask-length", "mask-with-targets", "positions-jump", "positions-start", "seq-lengths-sum",
         "seq-lengths-disagree", "unknown-sequence-key", "packed-row-as-one", "string", "bool"],
)
def test_bad_samples_name_the_sample_and_the_fix(obj, exc, match):
    with pytest.raises(exc, match=match):
        as_sample(obj, 3)


def test_object_array_is_refused():
    with pytest.raises(TypeError, match=r"sample 0: input_ids is an object array; token ids must be integers"):
        as_sample(np.array([1, "a"], dtype=object))


# -- the ecosystem's row conventions --------------------------------------------------------------

def test_transformers_labels_are_unshifted_and_converted():
    # The prompt masked: positions 1..3 predict tokens 12..14; the last position predicts nothing.
    s = as_sample({"input_ids": [10, 11, 12, 13, 14], "labels": [-100, -100, 12, 13, 14]})
    assert s.labels.tolist() == [-100, 12, 13, 14, -100]
    # labels == input_ids (transformers' plain causal LM) is the ids shifted, the same as no labels.
    assert as_sample({"input_ids": [4, 5, 6], "labels": [4, 5, 6]}).labels.tolist() == [5, 6, -100]
    # A run of one repeated token fits both readings: taken as transformers' own.
    assert as_sample({"input_ids": [7, 7, 7], "labels": [7, 7, 7]}).labels.tolist() == [7, 7, -100]


def test_targets_key_is_taken_as_given():
    assert as_sample({"input_ids": [5, 6, 7], "targets": [6, 7, 8]}).labels.tolist() == [6, 7, 8]


@pytest.mark.parametrize("key", ["completion_mask", "assistant_masks"])
def test_trl_loss_masks_learn_only_the_marked_tokens(key):
    # TRL: 1 where the token is learned. Tokens 12 and 13 are the completion: predicted from 11 and 12.
    s = as_sample({"input_ids": [10, 11, 12, 13], key: [0, 0, 1, 1]})
    assert s.input_ids.tolist() == [10, 11, 12, 13] and s.labels.tolist() == [-100, 12, 13, -100]
    both = as_sample({"input_ids": [10, 11, 12, 13], "labels": [-100, 11, 12, -100], key: [0, 0, 1, 1]})
    assert both.labels.tolist() == [-100, 12, -100, -100]  # learned where labels and the mask both say so


@pytest.mark.parametrize("mask, ids", [([1, 1, 1, 0, 0], [5, 6, 7, 0, 0]), ([0, 0, 1, 1, 1], [0, 0, 5, 6, 7])],
                         ids=["right", "left"])
def test_attention_mask_strips_padding_on_either_side(mask, ids):
    s = as_sample({"input_ids": ids, "attention_mask": mask, "labels": [i if m else -100 for i, m in zip(ids, mask)]})
    assert s.input_ids.tolist() == [5, 6, 7] and s.labels.tolist() == [6, 7, -100]
    assert as_sample({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask, dtype=torch.bool)}) \
        .input_ids.tolist() == [5, 6, 7]
    assert as_sample({"input_ids": ids, "attention_mask": [bool(m) for m in mask]}).input_ids.tolist() == [5, 6, 7]


def test_packed_rows_split_back_into_documents():
    # DataCollatorWithFlattening's output: position_ids restart, labels -100 at each document's start.
    row = {"input_ids": [[1, 2, 3, 4, 5]], "position_ids": [[0, 1, 2, 0, 1]], "labels": [[-100, 2, 3, -100, 5]]}
    row = {k: torch.tensor(v) for k, v in row.items()}  # its (1, T) tensors, stored as a row
    docs = as_samples(row)
    assert [d.input_ids.tolist() for d in docs] == [[1, 2, 3], [4, 5]]
    assert [d.labels.tolist() for d in docs] == [[2, 3, -100], [5, -100]]
    trl = as_samples({"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]})
    assert [d.labels.tolist() for d in trl] == [[2, -100], [4, 5, -100]]


def test_metadata_passes_and_ignore_keys_opts_out():
    assert as_sample({"input_ids": [5, 6], "text": "hi", "id": 3}).input_ids.tolist() == [5, 6]
    assert as_sample({"input_ids": [5, 6], "token_type_ids": [0, 0]}, ignore_keys=["token_type_ids"]).labels.tolist() \
        == [6, -100]
