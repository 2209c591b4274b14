"""Packed batches for other libraries: ``hf`` turns a :class:`~packing.Batch` into keyword arguments
for a Hugging Face transformers model (transformers itself is imported only by what needs it)."""
