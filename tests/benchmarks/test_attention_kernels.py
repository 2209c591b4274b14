import os
import subprocess
import sys

import pytest
import torch

from benchmarks.attention_kernels import padded


def test_on_a_cpu_it_says_it_needs_a_gpu_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.attention_kernels", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("python -m benchmarks.attention_kernels: error: the attention kernels need a CUDA "
                                   "GPU; run this on one (--device cuda)")


def test_a_misspelled_kernel_name_message(capsys):
    from benchmarks.attention_kernels import KNOWN, main

    # Checked before the GPU check, so it fails in one line on any machine.
    assert main(["--device", "cpu", "--kernels", "torch.varlen_attn", "flash-attn3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m benchmarks.attention_kernels: error: unknown kernel 'flash-attn3' in --kernels; "
        f"choose from {', '.join(KNOWN)}")


def test_padded_layout_holds_each_document_in_its_row():
    x = torch.arange(5 * 2 * 1, dtype=torch.float32).reshape(5, 2, 1)  # (T, H, D), documents of 3 and 2
    out = padded(x, [3, 2])  # (B, H, L, D)
    assert out.shape == (2, 2, 3, 1)
    assert torch.equal(out[0].transpose(0, 1), x[:3]) and torch.equal(out[1, :, :2].transpose(0, 1), x[3:])
    assert out[1, :, 2].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_kernel_that_loads_is_timed(tmp_path):
    import json

    from benchmarks.attention_kernels import main

    out = tmp_path / "k.json"
    assert main(["--batch-size", "4", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {r["kernel"] for r in records} >= {"torch.varlen_attn"} and all(r["fwd_ms"] > 0 for r in records if r["status"] == "ok")
