"""Which documents share a batch: best-fit-decreasing bin packing (``binpack``), the map-style
batch samplers (``samplers``: ``PackingSampler``, ``LengthBucketSampler``) and the streaming packer
for iterable datasets (``stream``: ``StreamPacker``), and restoring a streaming loader's state
(``resume``: ``restore_loader``)."""

from packing.sampling.binpack import best_fit_decreasing
from packing.sampling.samplers import LengthBucketSampler, PackingSampler
from packing.sampling.resume import restore_loader
from packing.sampling.stream import StreamPacker, pack_sizes

__all__ = ["best_fit_decreasing", "LengthBucketSampler", "PackingSampler", "StreamPacker", "pack_sizes", "restore_loader"]
