import numpy as np
import pytest
import torch

from packing.sample import Sample, as_sample


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


def test_pair_and_dict_labels_are_aligned_targets():
    assert as_sample(([5, 6, 7], [6, 7, 8])).labels.tolist() == [6, 7, 8]
    s = as_sample({"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 9])})
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
        ({"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, ValueError, r"labels equal input_ids.*unshifted"),
        ("hello", TypeError, r"sample 3: input_ids is a str; expected a 1-D integer tensor"),
        (torch.tensor([True, False]), TypeError, r"dtype torch.bool"),
    ],
    ids=["empty", "2d", "float-tensor", "float-list", "float-ndarray", "negative", "length-mismatch",
         "bad-label", "dict-without-ids", "hf-unshifted-labels", "string", "bool"],
)
def test_bad_samples_name_the_sample_and_the_fix(obj, exc, match):
    with pytest.raises(exc, match=match):
        as_sample(obj, 3)


def test_object_array_is_refused():
    with pytest.raises(TypeError, match=r"sample 0: input_ids is an object array; token ids must be integers"):
        as_sample(np.array([1, "a"], dtype=object))
