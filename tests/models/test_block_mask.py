import torch
from property import given, settings, st

from models.attention.block_mask import block_structure, document_block_mask, document_ids


def dense_allowed(doc, causal):
    """(T, T) bool: slot q may see slot k. Only for small T, as the obviously correct reference."""
    same = doc[:, None] == doc[None, :]
    if causal:
        same &= torch.arange(len(doc))[None, :] <= torch.arange(len(doc))[:, None]
    return same


def per_block(allowed, block):
    """(nb, nb) any / all over each (query block, key block) tile, clipped at T."""
    T = allowed.shape[0]
    nb = -(-T // block)
    any_ = torch.zeros(nb, nb, dtype=torch.bool)
    all_ = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for j in range(nb):
            tile = allowed[i * block : (i + 1) * block, j * block : (j + 1) * block]
            any_[i, j], all_[i, j] = tile.any(), tile.all()
    return any_, all_


# Invariant: every tile with an allowed pair is visited (partial or full), no empty tile is visited,
# and a tile is skipped-over-as-full only if every pair in it is allowed.
@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=8), pad=st.integers(0, 20),
       causal=st.booleans(), block=st.sampled_from([4, 8, 16]))
def test_block_structure_matches_the_dense_mask(lens, pad, causal, block):
    doc = document_ids(tuple(lens), sum(lens) + pad)
    partial, full = block_structure(doc, causal=causal, block_size=block)
    any_, all_ = per_block(dense_allowed(doc, causal), block)
    assert torch.equal(partial | full, any_)
    assert not (partial & full).any()
    assert not (full & ~all_).any()


def test_docstring_example():
    doc = document_ids((100, 200), 312)
    partial, full = block_structure(doc, causal=True)
    assert partial.nonzero().tolist() == [[0, 0], [1, 0], [1, 1], [2, 0], [2, 1], [2, 2]]
    assert not full.any()
    partial, full = block_structure(doc, causal=False)
    assert full.nonzero().tolist() == [[1, 1]]  # block 1 lies inside document 1


def test_block_mask_object_has_the_structure():
    mask = document_block_mask((100, 300, 5), 512, causal=True, device=torch.device("cpu"))
    partial, full = block_structure(document_ids((100, 300, 5), 512), causal=True)
    assert torch.equal(mask.to_dense()[0, 0].bool(), partial | full)
    assert mask.shape[-2:] == (512, 512)
