"""Variable-length sequence packing: one batch contract, five collators, and the samplers and data
readers around them.

The tree names the concepts:

- ``packing.batch``: the :class:`Batch` contract; ``packing.collate``: the five collators;
  ``packing.sample``: the sample forms they accept; ``packing.loader``: a DataLoader whose sampler and collator agree; ``packing.boundaries``: the boundary arithmetic
  every layout shares; ``packing.distributed``: loss normalisation across ranks;
  ``packing.report``: the padding report before a training run;
- ``packing.sampling``: which documents share a batch (bin packing, samplers, streaming packer);
- ``packing.data``: where documents come from (shards, tokenizers, synthetic data, splitting);
- ``packing.interop``: handing batches to other libraries (transformers: ``packing.interop.hf.pack(model)``);
- ``packing.kernels``: the one door to the varlen GPU kernels (what loads, and which a layer runs).

``import packing`` imports nothing from ``models`` (the toy GPT) or ``benchmarks`` (the harness).
"""

__version__ = "0.2.0"  # the one version string (pyproject reads it); CHANGELOG.md says what changed

from packing.batch import LAYOUTS, Batch
from packing.collate import (
    COLLATORS,
    Collator,
    ConcatCuSeqlens,
    NestedJagged,
    PadToLongest,
    PadToMax,
    XformersBlockDiagonal,
    get_collator,
)
from packing.data.hf_stream import HFStream
from packing.data.packed_rows import PackedRows
from packing.data.split import SplitDocuments
from packing.data.synthetic import SyntheticDocs
from packing.loader import make_loader
from packing.sample import IGNORE_INDEX, Sample, as_sample, as_samples
from packing.sampling.resume import restore_loader
from packing.sampling.samplers import LengthBucketSampler, PackingSampler
from packing.sampling.stream import StreamPacker

__all__ = [
    "LAYOUTS",
    "Batch",
    "COLLATORS",
    "Collator",
    "ConcatCuSeqlens",
    "NestedJagged",
    "PadToLongest",
    "PadToMax",
    "XformersBlockDiagonal",
    "get_collator",
    "IGNORE_INDEX",
    "Sample",
    "as_sample",
    "as_samples",
    "make_loader",
    "SyntheticDocs",
    "LengthBucketSampler",
    "PackingSampler",
    "SplitDocuments",
    "HFStream",
    "PackedRows",
    "ShardDataset",
    "ShardStream",
    "StreamPacker",
    "restore_loader",
]


def __getattr__(name: str):
    # ShardDataset and ShardStream load on first use: imported here, packing.data.shards would be in
    # sys.modules before `python -m packing.data.shards` runs it, and runpy warns about that.
    if name in ("ShardDataset", "ShardStream"):
        from packing.data import shard_reader

        return getattr(shard_reader, name)
    raise AttributeError(f"module 'packing' has no attribute {name!r}")
