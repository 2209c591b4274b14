import dataclasses

import pytest
import torch

from packing import Batch, get_collator

DOCS = [[11, 12], [21, 22, 23], [31, 32]]  # the docstring's worked example


def test_worked_example_packed():
    b = get_collator("concat")(DOCS)
    assert b.input_ids.tolist() == [[11, 12, 21, 22, 23, 31, 32]]
    assert b.labels.tolist() == [[12, -100, 22, 23, -100, 32, -100]]
    assert b.position_ids.tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert b.cu_seqlens.tolist() == [0, 2, 5, 7] and b.cu_seqlens.dtype == torch.int32
    assert (b.max_seqlen, b.num_tokens, b.num_slots, b.num_targets) == (3, 7, 7, 4)
    assert isinstance(b.max_seqlen, int)


def test_worked_example_packed_with_padding_tail():
    b = get_collator("concat", pad_to_multiple_of=4)(DOCS)
    assert b.input_ids.tolist() == [[11, 12, 21, 22, 23, 31, 32, 0]]
    assert b.labels[0, 7].item() == -100 and b.position_ids[0, 7].item() == 0
    assert b.cu_seqlens.tolist() == [0, 2, 5, 7] and b.num_slots == 8
    assert b.padding_fraction == pytest.approx(1 / 8)


def test_worked_example_padded():
    b = get_collator("pad_longest", pad_to_multiple_of=4)(DOCS)
    assert b.input_ids.tolist() == [[11, 12, 0, 0], [21, 22, 23, 0], [31, 32, 0, 0]]
    assert b.labels.tolist() == [[12, -100, -100, -100], [22, 23, -100, -100], [32, -100, -100, -100]]
    assert b.position_ids.tolist() == [[0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert (b.num_tokens, b.num_slots, b.max_seqlen) == (7, 12, 3)


def test_worked_example_nested():
    b = get_collator("nested")(DOCS)
    assert b.input_ids.is_nested and b.input_ids.layout == torch.jagged
    assert b.input_ids.offsets().tolist() == [0, 2, 5, 7]
    # one shared offsets tensor, so the three NestedTensors have the same ragged structure
    assert b.labels.offsets() is b.input_ids.offsets() is b.position_ids.offsets()
    assert b.position_ids.values().tolist() == [0, 1, 0, 1, 2, 0, 1]
    assert (b.num_tokens, b.num_slots) == (7, 7)


def _packed(**changes):
    b = get_collator("concat")(DOCS)
    fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.init}
    return Batch(**{**fields, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"layout": "ragged"}, r"Batch.layout is 'ragged'; expected one of"),
        ({"seq_lens": ()}, r"Batch.seq_lens is empty"),
        ({"seq_lens": (2, 0, 5)}, r"Batch.seq_lens\[1\] is 0; every sequence has >= 1 token"),
        ({"cu_seqlens": torch.tensor([0, 2, 5, 7])}, r"Batch.cu_seqlens is torch.int64 \(4,\); expected int32 of shape \(4,\)"),
        ({"cu_seqlens": torch.tensor([0, 3, 5, 7], dtype=torch.int32)}, r"Batch.cu_seqlens is \[0, 3, 5, 7\]; expected \[0, 2, 5, 7\]"),
        ({"input_ids": torch.ones(1, 7, dtype=torch.int32)}, r"Batch.input_ids is torch.int32; expected an int64 tensor"),
        ({"labels": torch.full((1, 6), -100)}, r"Batch.labels has shape \(1, 6\); expected \(1, 7\)"),
        ({"seq_lens": (2, 3, 3), "cu_seqlens": torch.tensor([0, 2, 5, 8], dtype=torch.int32)}, r"packed layout is one row \(1, T\) with T >= num_tokens = 8"),
        ({"position_ids": torch.arange(7)[None]}, r"Batch.position_ids must restart at 0 for each sequence"),
        ({"input_ids": torch.tensor([[11, 12, 21, -1, 23, 31, 32]])}, r"Batch.input_ids has min -1"),
        ({"labels": torch.tensor([[12, -7, 22, 23, -100, 32, -100]])}, r"Batch.labels holds -7"),
        ({"num_targets": 5}, r"Batch.num_targets is 5; the tensors say 4"),
        ({"attention_mask": torch.ones(1, 7, dtype=torch.bool)}, r"Batch.attention_mask is set for layout 'packed'"),
    ],
)
def test_broken_invariant_names_field_value_and_expectation(changes, match):
    with pytest.raises(ValueError, match=match):
        _packed(**changes)


def test_padded_layout_invariants():
    b = get_collator("pad_longest", pad_to_multiple_of=4)(DOCS)
    fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.init}
    with pytest.raises(ValueError, match=r"padded layout needs a bool mask of shape \(3, 4\)"):
        Batch(**{**fields, "attention_mask": None})
    left = b.attention_mask.flip(1)
    with pytest.raises(ValueError, match=r"expected right padding"):
        Batch(**{**fields, "attention_mask": left})
    labels = b.labels.clone()
    labels[0, 3] = 5
    with pytest.raises(ValueError, match=r"Batch.labels at padding must be ignore_index -100"):
        Batch(**{**fields, "labels": labels})
    with pytest.raises(ValueError, match=r"Batch.input_ids.is_nested is False but layout is 'nested'"):
        Batch(**{**fields, "layout": "nested", "attention_mask": None})


def test_xformers_bias_must_match_sequences():
    b = get_collator("xformers", pad_to_multiple_of=4)(DOCS)
    assert b.attn_bias.q_seqinfo.seqstart_py == [0, 2, 5, 7, 8]  # padding tail is its own block
    wrong = type(b.attn_bias).from_seqlens([2, 5, 1])
    with pytest.raises(ValueError, match=r"attn_bias has block starts \[0, 2, 7, 8\]; expected \[0, 2, 5, 7, 8\]"):
        dataclasses.replace(b, attn_bias=wrong)


def test_device_batch_needs_host_counts():
    b = get_collator("concat")(DOCS).to("meta")  # .to() carries the host counts over
    assert b.input_ids.device.type == "meta" and b.num_targets == 4 and b.max_token_id == 32
    with pytest.raises(ValueError, match=r"needs num_targets and max_token_id given; .* would sync"):
        dataclasses.replace(b, num_targets=None)


@pytest.mark.parametrize("name", ["pad_longest", "nested", "concat", "xformers"])
def test_to_moves_every_tensor(name):
    b = get_collator(name)(DOCS).to("meta")
    tensors = [b.input_ids, b.labels, b.position_ids, b.cu_seqlens]
    if b.layout == "nested":
        tensors += [t.values() for t in tensors[:3]] + [b.input_ids.offsets()]
        assert b.labels.offsets() is b.input_ids.offsets()
    if b.attention_mask is not None:
        tensors.append(b.attention_mask)
    if b.attn_bias is not None:
        tensors += [b.attn_bias.q_seqinfo.seqstart, b.attn_bias.k_seqinfo.seqstart]
    assert all(t.device.type == "meta" for t in tensors)
    assert (b.num_tokens, b.max_seqlen, b.seq_lens) == (7, 3, (2, 3, 2))


@pytest.mark.parametrize("name", ["pad_longest", "nested", "concat", "xformers"])
def test_pin_memory_pins_every_tensor(name, monkeypatch):
    # A CPU-only machine cannot pin memory, so record what would be pinned instead.
    pinned = []

    def fake_pin(self):
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    b = get_collator(name)(DOCS)
    p = b.pin_memory()
    expected = 4 + (b.attention_mask is not None) + (b.layout == "nested")  # + offsets for nested
    assert len(pinned) == expected
    unwrap = (lambda t: t.values()) if b.layout == "nested" else (lambda t: t)
    for field in ("input_ids", "labels", "position_ids"):
        assert any(unwrap(getattr(p, field)).data_ptr() == t.data_ptr() for t in pinned)
        assert torch.equal(unwrap(getattr(p, field)), unwrap(getattr(b, field)))
    assert p.split()[1].input_ids.tolist() == [21, 22, 23]


@pytest.mark.parametrize("name", ["pad_max", "pad_longest", "nested", "concat", "xformers"])
def test_unwrap_wrap_round_trip(name):
    opts = {"max_len": 8} if name == "pad_max" else {}
    b = get_collator(name, **opts)(DOCS)
    dense = b.unwrap(b.input_ids)
    assert dense.shape == {"padded": (3, 8 if name == "pad_max" else 64), "nested": (7,), "packed": (7,)}[b.layout]
    again = b.wrap(dense)
    assert [t.tolist() for t in b.per_sequence(again)] == DOCS


def test_more_invariants_are_named():
    padded = get_collator("pad_longest", pad_to_multiple_of=4)(DOCS)
    fields = {f.name: getattr(padded, f.name) for f in dataclasses.fields(padded) if f.init}
    bias = get_collator("xformers")(DOCS).attn_bias
    with pytest.raises(ValueError, match=r"Batch.attn_bias is set for layout 'padded'; only 'packed' has one"):
        Batch(**{**fields, "attn_bias": bias})
    with pytest.raises(ValueError, match=r"the padded layout is \(num_seqs=3, L\) with L >= max_seqlen = 3"):
        Batch(**{**fields, **{k: fields[k][:2] for k in ("input_ids", "labels", "position_ids", "attention_mask")}})
    nested = get_collator("nested")(DOCS)
    nfields = {f.name: getattr(nested, f.name) for f in dataclasses.fields(nested) if f.init}
    other = torch.nested.nested_tensor_from_jagged(nested.labels.values(), torch.tensor([0, 3, 5, 7]))
    with pytest.raises(ValueError, match=r"Batch.labels offsets differ from input_ids offsets"):
        Batch(**{**nfields, "labels": other})


def test_worked_example_static_shapes():
    b = get_collator("concat", total_tokens=8, max_seqs=4, max_seqlen=3)(DOCS)
    assert b.static_cu_seqlens.tolist() == [0, 2, 5, 7, 8, 8, 8, 8] and b.static_cu_seqlens.dtype == torch.int32
    assert b.static_max_seqlen == 3 and b.cu_seqlens.tolist() == [0, 2, 5, 7]
    moved = b.to("meta")
    assert moved.static_cu_seqlens.device.type == "meta" and moved.static_max_seqlen == 3


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"static_max_seqlen": None}, r"static_cu_seqlens and static_max_seqlen go together; set both or neither"),
        ({"static_max_seqlen": 2}, r"Batch.static_max_seqlen is 2; expected an int >= max_seqlen 3"),
        ({"static_cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32)},
         r"Batch.static_cu_seqlens is torch.int32 \(3,\); expected int32 of shape \(S,\) with S >= 4"),
        ({"static_cu_seqlens": torch.tensor([0, 2, 5, 7, 8, 8, 8, 8])},
         r"Batch.static_cu_seqlens is torch.int64 \(8,\); expected int32"),
        ({"static_cu_seqlens": torch.tensor([0, 2, 5, 7, 7, 8, 8, 8], dtype=torch.int32)},
         r"static_cu_seqlens is \[0, 2, 5, 7, 7, 8, 8, 8\]; expected \[0, 2, 5, 7, 8, 8, 8, 8\] \(the sequences, "
         r"the padding tail in blocks of at most static_max_seqlen 3, then empty sequences\)"),
    ],
)
def test_static_boundaries_invariants(changes, match):
    b = get_collator("concat", total_tokens=8, max_seqs=4, max_seqlen=3)(DOCS)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(b, **changes)


def test_static_boundaries_only_in_the_packed_layout():
    static = get_collator("concat", total_tokens=8, max_seqs=4, max_seqlen=3)(DOCS)
    padded = get_collator("pad_longest")(DOCS)
    with pytest.raises(ValueError, match=r"static_cu_seqlens is set for layout 'padded'; only 'packed' has one"):
        dataclasses.replace(padded, static_cu_seqlens=static.static_cu_seqlens, static_max_seqlen=3)
