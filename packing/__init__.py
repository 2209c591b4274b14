"""Variable-length sequence packing: one batch contract, five collators."""

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
from packing.sample import IGNORE_INDEX, Sample, as_sample
from packing.sampler import LengthBucketSampler, PackingSampler
from packing.split import SplitDocuments
from packing.stream import StreamPacker
from packing.synthetic import SyntheticDocs

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
    "SyntheticDocs",
    "LengthBucketSampler",
    "PackingSampler",
    "SplitDocuments",
    "StreamPacker",
]
