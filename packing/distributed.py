"""Loss normalisation across ranks and gradient-accumulation steps.

The loss a data-parallel step optimises is the mean over every real target token it sees, on every
rank and in every accumulation micro-batch, so that each token weighs the same however documents
fell into batches. Averaging per-batch means does not do that: a rank whose batch holds few targets
would weigh each of them more. So each rank sums its micro-batches' ``num_targets`` (host ints), one
all-reduce adds them up across ranks, and every micro-batch's summed cross-entropy is divided by
that global count. DDP and FSDP then *average* gradients over ranks, which divides by the world
size once more; :func:`loss_scale` undoes that.

Example, inside a training step with micro-batches ``micro``::

    total = global_num_targets(sum(b.num_targets for b in micro), device)
    for b in micro:
        loss = lm_loss(model(b), b, normalizer=total) * loss_scale()
        loss.backward()          # (use model.no_sync() for all but the last micro-batch under DDP)

Tested: two gloo ranks with two micro-batches each produce the gradients of one process over all
the documents in one batch (``tests/packing/test_distributed.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from packing.boundaries import host_to_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def global_num_targets(local: int, device: torch.device | str) -> torch.Tensor:
    """The sum of ``local`` over all ranks, as a 0-d int64 tensor on ``device``.

    It stays on the device, so dividing by it needs no host sync; the all-reduce is the one
    collective it costs. Without a process group it is ``local``.
    """
    count = host_to_device(torch.tensor(local, dtype=torch.int64), device)
    if is_distributed():
        dist.all_reduce(count)
    return count


def loss_scale() -> int:
    """Multiply the loss by this: DDP and FSDP average gradients over ranks, the loss wants their sum."""
    return world_size()
