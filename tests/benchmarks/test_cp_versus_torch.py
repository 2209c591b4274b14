import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.cp import document_attention
from benchmarks.cp_versus_torch import _errors, torch_padding
from cli_error import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
LAST = re.compile(r"versus torch N=(\d+): ours (\S+) ms, torch (\S+) ms a step; tokens/s per rank ours/torch n/a; "
                  r"exact: ours yes, torch yes; torch's row padded (\S+)%")


@pytest.mark.parametrize("world", [2, 3])
def test_ours_and_torchs_context_parallel_attention_are_both_exact_on_the_same_row(world, tmp_path):
    # 1-token documents, documents shorter than 2N and a long one cut across the ranks: ours runs
    # the row as it is, torch's on documents padded to 2N and a row padded to 128 N. Both match
    # each document alone in fp64 (torch's forward only: flex attention has no CPU backward).
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("5 1 64 3 29 1 1 17 40\n")
    out = tmp_path / "versus.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
           "benchmarks.cp_versus_torch", "--device", "cpu", "--lengths", str(lengths), "--heads", "4", "--kv-heads", "2",
           "--head-dim", "16", "--repeats", "1", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    match = LAST.fullmatch(run.stdout.strip().splitlines()[-1])
    assert match and int(match[1]) == world, run.stdout[-500:]
    record = json.loads(out.read_text())
    assert record["torch_positions"] == 128 * world and record["tokens"] == 161
    assert set(record["ours_errors"]) == {"out", "dq", "dk", "dv"} and set(record["torch_errors"]) == {"out"}
    assert max(record["ours_errors"].values()) <= 1e-12 and record["torch_errors"]["out"] <= 1e-12
    assert record["torch_forward_only"] and record["ours_over_torch"] is None


def test_the_check_sees_a_document_reading_anothers_keys():
    # The negative control of the exactness check: the same tokens attended as one document (keys
    # crossing the boundaries) are far from each document alone at the rows after the first one.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref, _ = document_attention(q, k, v, [5, 7], causal=True)
    leaky, _ = document_attention(q, k, v, [12], causal=True)
    rows = torch.arange(12)
    (err, norm), = _errors([leaky], [ref], rows)
    assert (err / norm).sqrt() > 1e-2
    (err, norm), = _errors([leaky[:5]], [ref], rows[:5])  # the first document's rows see no other
    assert (err / norm).sqrt() <= 1e-12


def test_torchs_padding_rounds_each_document_to_2n_and_the_row_to_128n():
    assert torch_padding([5, 8, 1], 2) == [8, 8, 4, 236]
    padded = torch_padding([1000, 3, 1], 4)
    assert padded[:3] == [1000, 8, 8] and sum(padded) % 512 == 0 and all(n % 8 == 0 for n in padded)
    assert torch_padding([256], 2) == [256]  # nothing to add


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "benchmarks.cp_versus_torch runs under torchrun: torchrun --nproc-per-node N -m "
                          "benchmarks.cp_versus_torch --device cpu"),
    (["--heads", "6", "--kv-heads", "4"], "--heads 6 is not a multiple of --kv-heads 4"),
    (["--repeats", "0"], "--repeats is 0; expected an int >= 1"),
])
def test_a_user_error_is_one_line_and_exit_2(args, message):
    assert_one_line_error("benchmarks.cp_versus_torch", args, message)
