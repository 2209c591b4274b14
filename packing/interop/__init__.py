"""Packed batches for other libraries: ``hf`` turns a :class:`~packing.Batch` into keyword arguments
for a Hugging Face transformers model (transformers itself is imported only by what needs it)."""

from packing.interop import hf_families


def _verify_config(config, implementation):
    # Imported at the first check, not here: `python -m packing.interop.verify` must find the
    # module unimported when it runs it.
    from packing.interop.verify import verify_config

    return verify_config(config, implementation)


def _verify_loss(config, loss, *, router):
    from packing.interop.verify import verify_loss

    return verify_loss(config, loss, router=router)


# check_model (and the chunked loss) verify the model's own config with verify, which itself runs
# their callers (the packed kwargs): the package wires them together.
hf_families.set_verifier(_verify_config, _verify_loss)
