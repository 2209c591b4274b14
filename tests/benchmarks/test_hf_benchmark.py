import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

from benchmarks.hf import main  # noqa: E402

TINY = ["--device", "cpu", "--layers", "2", "--dim", "64", "--steps", "2", "--warmup", "1", "--batch-size", "4"]


def test_every_row_sees_the_same_documents_and_weights(tmp_path):
    out = tmp_path / "hf.json"
    assert main([*TINY, "--mode", "eval", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["pad_max+sdpa", "pad_longest+sdpa", "concat+packing_varlen", "concat+sdpa"]
    base = records[0]
    assert base["speedup_vs_baseline"] == 1.0 and records[2]["padding_fraction"] == 0.0
    # Same documents, same weights, exact attention in every layout: the eval losses agree.
    assert all(abs(r["loss"] - base["loss"]) / base["loss"] <= 1e-5 for r in records)


def test_user_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hf", *TINY, "--methods", "concat+flash_attention_2"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines == ["python -m benchmarks.hf: error: concat+flash_attention_2 needs CUDA and the flash-attn package; "
                     "leave it out of --methods"]
