"""Packed batches for other libraries: ``hf`` turns a :class:`~packing.Batch` into keyword arguments
for a Hugging Face transformers model (transformers itself is imported only by what needs it)."""

from packing.interop import hf_families


def _verify_config(config, implementation):
    # Imported at the first check, not here: `python -m packing.interop.verify` must find the
    # module unimported when it runs it.
    from packing.interop.verify import verify_config

    return verify_config(config, implementation)


# check_model verifies the model's own config with verify, which itself runs check_model's callers
# (hf_kwargs): the package wires the two together.
hf_families.set_verifier(_verify_config)
