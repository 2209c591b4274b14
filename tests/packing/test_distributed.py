"""Data parallelism through the real torchrun entry point, 2 gloo ranks on CPU, bounded in time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import GPT, lm_loss
from packing import get_collator

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds: a hung collective fails the test instead of stalling CI


def torchrun(*args, nproc=2):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)


def test_two_ranks_give_the_gradients_of_one(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import ddp_worker

    out = tmp_path / "grads.pt"
    proc = torchrun(str(Path(__file__).parent / "ddp_worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_grads = torch.load(out)

    torch.manual_seed(0)
    model = GPT(ddp_worker.CONFIG, attn="naive")
    docs = ddp_worker.documents()
    batch = get_collator("concat")([docs[i] for i in range(len(docs))])  # everything, one batch, one process
    lm_loss(model(batch), batch).backward()
    for name, p in model.named_parameters():
        rel = ((ddp_grads[name] - p.grad).norm() / p.grad.norm()).item()
        assert rel <= 1e-5, (name, rel)


@pytest.mark.parametrize("extra", [[], ["--sampler", "pack", "--max-tokens", "1024"], ["--fsdp"]],
                         ids=["ddp-fixed", "ddp-pack-sampler", "fsdp2"])
def test_benchmark_under_torchrun_merges_rank_records(tmp_path, extra):
    import json

    out = tmp_path / "r.json"
    proc = torchrun("-m", "benchmarks.varlen", "--collate", "concat", "--device", "cpu", "--steps", "2",
                    "--warmup", "1", "--batch-size", "4", "--no-baseline", "--json", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    ranks = [r for r in records if r["rank"] is not None]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in records)
    merged = [r for r in records if r["rank"] is None]
    assert len(merged) == 1 and merged[0]["tokens_per_s"] > 0
    assert merged[0]["loss"] == ranks[0]["loss"] == ranks[1]["loss"]  # the global mean, the same on every rank
    assert proc.stdout.count("real tok/s") == 2  # only rank 0 prints: its row line, then the merged table
    assert proc.stdout.count("real tok/s on rank 0 of 2 (the table sums the ranks)") == 1


def test_rank_with_no_data_is_a_clear_error(tmp_path):
    import numpy as np

    from packing.data.shards import ShardWriter

    with ShardWriter(tmp_path / "s", vocab_size=259, tokenizer="bytes") as w:
        w.write("only", np.ones(50, dtype=np.uint16))  # one document, two ranks
    proc = torchrun("-m", "benchmarks.varlen", "--collate", "concat", "--device", "cpu", "--sampler", "pack",
                    "--max-tokens", "256", "--data", str(tmp_path / "s"), "--steps", "1", "--warmup", "0")
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("python -m benchmarks.varlen: error:")]
    # Both ranks raise it, but torchrun terminates the other worker as soon as one exits non-zero,
    # so sometimes only one line gets out (seen in 1 of 4 full suite runs).
    assert 1 <= len(errors) <= 2 and all("a rank would get no data" in l for l in errors), proc.stderr[-2000:]
    assert "Traceback" not in "\n".join(l for l in proc.stderr.splitlines() if "benchmarks/varlen.py" in l)
