"""A FlexAttention ``BlockMask`` for packed documents, built on the host from the sequence lengths.

``create_block_mask`` evaluates the mask function over every (query, key) pair, or over every block
pair on the device, every time it is called, which others report costing more than the attention
it masks.
Packed documents are contiguous and sorted, so the block structure follows from the lengths alone:
a (query block, key block) pair is

- *empty* when the two blocks share no document (or, causal, the key block is in the future),
- *full* when both blocks lie inside one single document (and, causal, the key block is strictly
  earlier), so no per-element mask is needed,
- *partial* otherwise, where the ``mask_mod`` decides per element.

That is a (num_blocks x num_blocks) computation on host ints, with num_blocks = ceil(T / 128);
no T x T tensor is ever made. The result is built once per batch and shared by every layer.

Example, lengths 100, 200 and a padding tail of 12 (T = 312, three blocks of 128), causal::

    documents per block: block 0 -> docs 0..1, block 1 -> doc 1, block 2 -> docs 1..2
    partial: (0,0) (1,0) (1,1) (2,0) (2,1) (2,2); full: none (no block holds one document only
    while its key block is strictly earlier and also holds only that document)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from packing.boundaries import block_lengths, host_to_device

BLOCK_SIZE = 128  # FlexAttention's default tile


def document_ids(seq_lens: tuple[int, ...], total: int) -> Tensor:
    """(total,) int32 document index per slot; a padding tail past sum(seq_lens) is one more document."""
    lens = block_lengths(seq_lens, total)
    return torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens))


def block_structure(doc: Tensor, *, causal: bool, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(partial, full): two (num_blocks, num_blocks) bool tensors over (query block, key block)."""
    total = doc.numel()
    starts = torch.arange(0, total, block_size)
    lo = doc[starts]  # (num_blocks,) first document in each block
    hi = doc[torch.clamp(starts + block_size, max=total) - 1]  # last document in each block
    shares = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])  # document ranges overlap
    one_doc = lo == hi
    full = one_doc[:, None] & one_doc[None, :] & (lo[:, None] == lo[None, :])
    if causal:
        q_block, k_block = starts[:, None], starts[None, :]
        shares &= k_block <= q_block
        full &= k_block < q_block
    return shares & ~full, full


def _as_kv_blocks(m: Tensor) -> tuple[Tensor, Tensor]:
    """(1, 1, nb) int32 counts and (1, 1, nb, nb) int32 key-block indices, the True columns first."""
    num = m.sum(1, dtype=torch.int32)
    indices = torch.argsort((~m).to(torch.uint8), dim=1, stable=True).to(torch.int32)
    return num[None, None], indices[None, None]


def document_block_mask(
    seq_lens: tuple[int, ...], total: int, *, causal: bool, device: torch.device, block_size: int = BLOCK_SIZE
) -> BlockMask:
    """The document (plus causal) ``BlockMask`` for a packed row of ``total`` slots.

    seq_lens: host ints, the documents in the row, in order; slots past their sum are padding.
    Returns a mask where slot q may attend slot k iff both are in the same document (and k <= q when
    causal). Real tokens never see the padding tail, which only attends to itself.
    """
    doc = document_ids(seq_lens, total)
    partial, full = block_structure(doc, causal=causal, block_size=block_size)
    kv_num, kv_idx = _as_kv_blocks(partial)
    full_num, full_idx = _as_kv_blocks(full)
    doc_dev = host_to_device(doc, device)

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc_dev[q_idx] == doc_dev[kv_idx]) & (kv_idx <= q_idx)

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return doc_dev[q_idx] == doc_dev[kv_idx]

    return BlockMask.from_kv_blocks(
        host_to_device(kv_num, device),
        host_to_device(kv_idx, device),
        host_to_device(full_num, device),
        host_to_device(full_idx, device),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(total, total),
    )
