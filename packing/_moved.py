"""Old module paths, kept importing after the move into subpackages, with a ``FutureWarning``
that names the new path. Importing an old path gives the new module itself (not a copy), so
classes, registries and custom ops exist once; ``python -m`` on an old path runs the new module.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     warnings.simplefilter("always")
    ...     from packing.sampler import PackingSampler
    >>> PackingSampler.__module__
    'packing.sampling.samplers'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "packing.sampler": "packing.sampling.samplers",
    "packing.binpack": "packing.sampling.binpack",
    "packing.stream": "packing.sampling.stream",
    "packing.shard_reader": "packing.data.shard_reader",
    "packing.shards": "packing.data.shards",
    "packing.synthetic": "packing.data.synthetic",
    "packing.split": "packing.data.split",
    "packing.tokenizer": "packing.data.tokenizer",
    "packing.hf": "packing.interop.hf",
    "models.block_mask": "models.attention.block_mask",
    "models.flash4": "models.attention.flash4",
    "benchmarks.padding_report": "packing.report",
}


def _warn(old: str) -> None:
    warnings.warn(f"{old} moved to {MOVED[old]}; import that instead (the old path will be removed)",
                  FutureWarning, stacklevel=3)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        new = importlib.util.find_spec(MOVED[fullname])
        return importlib.machinery.ModuleSpec(fullname, self, origin=new.origin)

    def create_module(self, spec):
        _warn(spec.name)
        module = importlib.import_module(MOVED[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system wrote the old spec onto the new module; put its own back.
        module.__spec__, module.__loader__ = self._own_spec, self._own_spec.loader

    def get_code(self, fullname):  # python -m OLD: runpy runs the new module's code as __main__
        _warn(fullname)
        new = importlib.util.find_spec(MOVED[fullname])
        return new.loader.get_code(MOVED[fullname])


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.append(_Alias())
