import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cp_train import exposed_us
from cli_error import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
LAST = re.compile(r"cp_train N=(\d+): (\S+) ms/step, (\S+)k tokens/s per rank, exposed communication n/a, "
                  r"loss (\S+) -> (\S+)")


def _train(world: int, tmp_path: Path, *extra: str) -> dict:
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("5 1 64 3 29 1 1 17 40\n")  # 161 tokens: documents cut across ranks, and 1-token ones
    out = tmp_path / f"n{world}{''.join(extra)}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
           "benchmarks.cp_train", "--device", "cpu", "--arch", "tiny", "--lengths", str(lengths), "--steps", "3",
           "--warmup", "1", "--lr", "1e-2", "--json", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == (f"161 tokens, 9 documents (longest 64); N={world}, gloo, cpu; tiny"
                        + (", activation checkpointing" if "--checkpoint" in extra else "")
                        + (", cut documents over the fewest ranks" if "fewest" in extra else ""))
    match = LAST.fullmatch(lines[-1])
    assert match and int(match[1]) == world, lines[-1]
    return json.loads(out.read_text())


def test_training_context_parallel_follows_the_one_process_loss_curve(tmp_path):
    # The same seed, row and AdamW steps at N = 1, 2 and 3: every step's loss agrees to fp32's
    # rounding, while the loss itself falls (4.60 to 3.94). Summing each rank's gradients is what
    # keeps the curves together: without it, N = 2 ends at 3.81.
    one = _train(1, tmp_path)
    assert len(one["losses"]) == 4 and one["losses"][-1] < one["losses"][0] - 0.5
    # --checkpoint: each layer recomputed in the backward, its all-gathers run again there.
    # --spread fewest: at N = 3 the 40-token document is cut over two ranks, the 64 over three.
    for world, extra in ((2, ()), (3, ()), (2, ("--checkpoint",)), (3, ("--spread", "fewest"))):
        got = _train(world, tmp_path, *extra)
        assert got["checkpoint"] == ("--checkpoint" in extra) and got["spread"] == ("fewest" if extra[1:] else "all")
        assert got["world_size"] == world and got["tokens"] == 161 and len(got["step_ms"]) == 3
        for a, b in zip(got["losses"], one["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], one["losses"])
        assert got["exposed_comm_pct"] is None and got["tokens_per_s_per_rank"] > 0


def test_exposed_communication_counts_only_what_nothing_else_covers():
    assert exposed_us([], [(0, 5)]) == 0.0
    assert exposed_us([(0, 10)], [(0, 10)]) == 0.0
    assert exposed_us([(0, 10)], [(2, 4), (3, 6), (8, 20)]) == 4.0  # [0, 2) and [6, 8)
    assert exposed_us([(0, 10), (5, 15)], [(12, 30)]) == 12.0  # the comm spans merged first


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "benchmarks.cp_train runs under torchrun: torchrun --nproc-per-node N -m benchmarks.cp_train --device cpu"),
    (["--steps", "0"], "--steps is 0; expected an int >= 1"),
    (["--warmup", "-1"], "--warmup is -1; expected an int >= 0"),
    (["--lr", "0"], "--lr 0 is out of range; expected a finite number > 0"),
    (["--arch", "gpt5"], "argument --arch: invalid choice: 'gpt5'"),
])
def test_a_user_error_is_one_line_and_exit_2(args, message):
    assert_one_line_error("benchmarks.cp_train", args, message)


def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    env = {**os.environ, "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "benchmarks.cp_train", "--device", "cuda"], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert run.returncode == 2
    assert run.stderr.strip() == ("python -m benchmarks.cp_train: error: --device cuda, but no CUDA device is visible; "
                                  "use --device cpu --arch tiny")
