"""Packed batches for other libraries: ``hf`` turns a :class:`~packing.Batch` into keyword arguments
for a Hugging Face transformers model (transformers itself is imported only by what needs it)."""

from packing.interop import hf_families, hf_verify

# check_model measures a family on a transformers release other than the committed matrix's with
# hf_verify, which itself runs check_model's callers: the package wires the two together.
hf_families.set_measurer(hf_verify.measured)
