"""transformers' Trainer with gradient accumulation over packed batches trains as over the same documents padded.

The loss of a step is the token mean over every target of the step's micro-batches: transformers
counts them (``num_items_in_batch``) across the accumulated batches and each micro-batch's loss is
summed over its targets and divided by that count. A per-micro-batch mean would weigh a target by
how many others share its micro-batch, and packed and padded batches group the documents
differently. Measured here against the update computed by hand: fp32, CPU, 1e-5.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the dev extra has it)")

from equivalence import rel  # noqa: E402
from packing.interop.hf import pack  # noqa: E402
from trainer_worker import by_hand, padded, tiny, trained  # noqa: E402

TOL = 1e-5
WORKER = Path(__file__).with_name("trainer_worker.py")


@pytest.mark.parametrize("impl", ["packing_varlen", "sdpa", "eager"])
def test_accumulated_packed_steps_equal_the_padded_update(tmp_path, impl):
    lr = 1.0
    expected = by_hand(lr)
    model = tiny("packing_varlen" if impl == "packing_varlen" else impl)
    packed = trained(tmp_path / "packed", model, pack(model), lr)
    padded_ = trained(tmp_path / "padded", tiny("sdpa"), padded, lr)
    # A mean of per-micro-batch means (micro-batches of two documents) is a different update: the
    # comparison can tell them apart.
    assert rel(by_hand(lr, groups=[[0, 1], [2, 3], [4, 5], [6, 7]]), expected) > 1e-2
    assert rel(packed, expected) <= TOL
    assert rel(padded_, expected) <= TOL


def test_two_gloo_ranks_update_as_one_process(tmp_path):
    # torchrun, 2 ranks on the CPU: each rank's micro-batches are its own, the target count is
    # global, and DDP averages the gradients; the update is still the token mean over all 8 documents.
    expected = by_hand(1.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parents[2]), os.environ.get("PYTHONPATH", "")])}
    for kind in ("packed", "padded"):
        out = tmp_path / f"{kind}.pt"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(WORKER), str(out), kind], env=env, timeout=180, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert rel(torch.load(out), expected) <= TOL, kind
