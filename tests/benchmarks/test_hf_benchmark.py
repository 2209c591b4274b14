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


def test_compiled_static_rows_compile_once(tmp_path):
    # The --compile comparison on a CPU: each row eager and compiled, with dynamo's counts recorded.
    # The static packs hold different document counts and still compile once, in one graph.
    out = tmp_path / "hf.json"
    argv = [*TINY, "--arch", "llama", "--kv-heads", "2", "--compile", "--max-tokens", "1024", "--max-seqs", "8",
            "--methods", "pad_max+sdpa", "static+packing_varlen", "--json", str(out)]
    assert main(argv) == 0
    records = {(r["method"], r["compiled"]): r for r in json.loads(out.read_text())}
    assert set(records) == {(m, c) for m in ("pad_max+sdpa", "static+packing_varlen") for c in (False, True)}
    static = records["static+packing_varlen", True]
    assert len(set(static["doc_counts"])) > 1 and static["steps"] >= 2
    assert static["graphs"] == 1 and static["graph_breaks"] == 0 and static["recompiles"] == 0
    assert records["static+packing_varlen", False]["graphs"] is None
    assert static["speedup_vs_compiled_baseline"] == static["tokens_per_s"] / records["pad_max+sdpa", True]["tokens_per_s"]


def test_too_few_packs_to_time_is_one_clear_error(capsys):
    # 2 documents fit in one pack: the compiled row's first step compiles, and nothing is left to time.
    argv = ["--device", "cpu", "--layers", "1", "--dim", "32", "--steps", "1", "--warmup", "0", "--batch-size", "2",
            "--compile", "--methods", "static+packing_varlen"]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("python -m benchmarks.hf: error: pad_max+sdpa has 1 steps (2 documents), none "
                                       "left to time after 1 warm-up step(s); raise --steps or lower --max-tokens\n")
