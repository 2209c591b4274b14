"""Restore a torchdata ``StatefulDataLoader`` from a saved state, on a first run and on a resume.

A streaming state is per DataLoader worker: each worker's position belongs to its share of the
shards. torchdata itself, given a state saved with another worker count, fails with a bare
``AssertionError: State doesn't contain key '_num_yielded'`` (saved with workers, loaded without)
or ``'_snapshot'`` (the other way), or with a worker's error deep in a traceback (2 workers into 1).
:func:`restore_loader` checks the count first and names both.

Examples:
    >>> from torch.utils.data import DataLoader
    >>> restore_loader(DataLoader([1, 2]), "no-such-checkpoint.pt")  # a first run: nothing to restore
    False
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

# torchdata's StatefulDataLoader calls torch.set_vital on every construction, which torch 2.13
# deprecates with a UserWarning: torchdata's call, nothing a user of restore_loader can change, so
# it is filtered wherever packing is imported (this module is, by ``import packing``). Only that
# message, only from torchdata's module.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning,
                        module="torchdata")


def saved_workers(state: dict[str, Any]) -> int:
    """The ``num_workers`` a ``StatefulDataLoader.state_dict()`` was taken with."""
    if not isinstance(state, dict):
        raise TypeError(f"a loader state is a dict from StatefulDataLoader.state_dict(); got {type(state).__name__}")
    if "_snapshot" in state:  # multiprocess: the main process's snapshot records the count
        try:
            return int(state["_snapshot"]["_main_snapshot"]["_num_workers"])
        except (KeyError, TypeError):
            return len(state["_snapshot"].get("_worker_snapshots", {}))
    if "_num_yielded" in state:  # single process
        return 0
    raise ValueError(f"the loader state has keys {sorted(state)[:6]}; it is not a StatefulDataLoader.state_dict()")


def restore_loader(loader: Any, state: dict[str, Any] | str | os.PathLike) -> bool:
    """Load ``state`` (a dict, or a path saved with ``torch.save``) into ``loader``, a torchdata
    ``StatefulDataLoader``. A path that does not exist is a first run: nothing is loaded and False
    is returned. A state saved with another ``num_workers`` raises ``ValueError`` naming both counts.
    Returns True when the state was loaded.
    """
    if isinstance(state, (str, os.PathLike)):
        if not os.path.exists(state):
            return False
        state = torch.load(state, weights_only=True)  # tensors and plain containers only: nothing unpickled
    saved, now = saved_workers(state), getattr(loader, "num_workers", 0)
    if saved != now:
        raise ValueError(
            f"the loader state was saved with num_workers={saved}, this loader has num_workers={now}; each worker's "
            f"position belongs to its own share of the shards: resume with num_workers={saved}, or start the epoch afresh"
        )
    loader.load_state_dict(state)
    return True
