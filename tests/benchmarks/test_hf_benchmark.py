import json
import os
import subprocess
import sys

import pytest
import torch

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


def test_padded_with_the_packed_kernels_learns_what_padding_learns(tmp_path):
    # pad_max+packing_varlen: each padded row one block of the varlen kernel, -100 at its padding.
    # The same documents, weights and targets as pad_max+sdpa, so the same loss; only kernels change.
    out = tmp_path / "hf.json"
    assert main([*TINY, "--arch", "llama", "--kv-heads", "2", "--mode", "eval", "--methods", "pad_max+packing_varlen",
                 "--json", str(out)]) == 0
    base, padded = json.loads(out.read_text())
    assert (base["method"], padded["method"]) == ("pad_max+sdpa", "pad_max+packing_varlen")
    assert padded["padding_fraction"] == base["padding_fraction"] > 0.2
    assert padded["doc_counts"] == base["doc_counts"]
    assert abs(padded["loss"] - base["loss"]) <= 1e-5 * base["loss"]
    assert padded["matmul_params"] > 0 and padded["gemm_tflops"] is None  # no GEMM rate on a CPU


def test_dynamic_packs_compile_once_over_the_epoch_and_several_archs_share_a_process(tmp_path):
    # dynamic+packing_varlen: the packs unpadded, their token and document dimensions marked dynamic.
    # Over every pack of the epoch (different token and document counts) it compiles once. Left to
    # automatic dynamic shapes it compiled three times here: static, then dynamic tokens, then
    # dynamic documents. Two --arch run one after another, each with its own rows and place.
    out = tmp_path / "hf.json"
    argv = [*TINY, "--arch", "llama", "gpt2", "--steps", "3", "--compile", "--compiled-only", "--no-baseline",
            "--max-tokens", "1024", "--max-seqs", "8", "--methods", "dynamic+packing_varlen", "static+packing_varlen",
            "--json", str(out)]
    assert main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["arch"], r["arch_order"], r["method"]) for r in records] == [
        ("llama", 0, "dynamic+packing_varlen"), ("llama", 0, "static+packing_varlen"),
        ("gpt2", 1, "dynamic+packing_varlen"), ("gpt2", 1, "static+packing_varlen")]
    for dynamic, static in (records[:2], records[2:]):
        assert len(set(dynamic["doc_counts"])) > 1 and dynamic["padding_fraction"] == 0.0 < static["padding_fraction"]
        assert (dynamic["graphs"], dynamic["recompiles"], static["graphs"], static["recompiles"]) == (1, 0, 1, 0)
        assert abs(dynamic["loss"] - static["loss"]) <= 1e-5 * static["loss"]
        assert dynamic["speedup_vs_compiled_baseline"] is None  # --no-baseline: no ratio


@pytest.mark.parametrize("argv, message", [
    (["--arch", "gpt2", "--liger"], "--liger takes --arch llama or qwen3-0.6b, got 'gpt2' (Liger Kernel has no patch "
                                    "for it); leave out --liger"),
    (["--memory-cap-gib", "78"], "--memory-cap-gib 78.0 caps CUDA memory; this run is on cpu"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead sets how the compiled rows compile; give "
                                             "--compile too"),
    (["--kernel", "torch.varlen_attn", "--methods", "pad_longest+sdpa"],
     "--kernel picks the kernel of the packing_varlen rows, and none of ['pad_max+sdpa', 'pad_longest+sdpa'] is one; "
     "add one (static+packing_varlen) or leave out --kernel"),
    (["--arch", "llama", "--checkpoint", "--methods", "pad_max+sdpa"],
     "--checkpoint applies to every row but the baseline, and only the baseline (pad_max+sdpa) runs; add a row with "
     "--methods or leave it out"),
    (["--arch", "llama", "--mode", "eval", "--checkpoint"],
     "--checkpoint recomputes activations in the backward; --mode eval has none: use --mode train or leave out "
     "--checkpoint"),
    (["--memory-budget", "0.5"], "--memory-budget 0.5 is torch.compile's; give --compile too"),
    (["--compile", "--memory-budget", "1.5"], "--memory-budget 1.5: expected a fraction in [0, 1) (1 is the default, "
                                              "nothing recomputed); e.g. --memory-budget 0.5"),
    (["--compile", "--mode", "eval", "--memory-budget", "0.5"],
     "--memory-budget 0.5 trades the backward's saved activations of every row but the baseline; it needs --mode "
     "train and a row besides the baseline"),
    (["--kernel", "flash-attn-4"], "packing_varlen kernels=['flash-attn-4']: ['flash-attn-4'] does not load here; "
                                   "the varlen kernels that load here are none (no CUDA): name some of those, or "
                                   "leave kernels=None"),
])
def test_lever_options_refuse_what_they_cannot_do(argv, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hf", *TINY, *argv], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.strip()] == [f"python -m benchmarks.hf: error: {message}"]


def test_no_model_outlives_its_row(monkeypatch):
    # Issue 24's second-model slowdown: a compiled model kept alive by the harness (its compiled
    # code, a closure) would hold its memory while the next model runs. Each row's model is gone
    # once the row returns, through architectures and compiled rows alike.
    import gc

    import transformers

    from benchmarks import hf

    alive = []
    run_method = hf.run_method

    def counting(*args, **kwargs):
        record = run_method(*args, **kwargs)
        gc.collect()
        alive.append(sum(isinstance(o, transformers.PreTrainedModel) for o in gc.get_objects()))
        return record

    monkeypatch.setattr(hf, "run_method", counting)
    argv = [*TINY, "--arch", "llama", "gpt2", "--compile", "--compiled-only", "--max-tokens", "1024",
            "--methods", "static+packing_varlen"]
    assert main(argv) == 0
    assert alive == [0, 0, 0, 0]  # pad_max+sdpa and static+packing_varlen, for each arch


def test_activation_checkpointing_trains_the_same_steps(tmp_path):
    # --checkpoint recomputes each layer in the backward (memory for compute): the same packs and
    # weights give the same training losses, step after step, as without it; the baseline stays plain.
    losses = {}
    for flag in ([], ["--checkpoint"]):
        out = tmp_path / f"hf{len(flag)}.json"
        assert main([*TINY, "--arch", "llama", "--max-tokens", "1024", "--methods",
                     "static+packing_varlen", *flag, "--json", str(out)]) == 0
        records = json.loads(out.read_text())
        assert [r["checkpoint"] for r in records] == [False, bool(flag)]
        losses[bool(flag)] = [r["loss"] for r in records]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_memory_budget_compiles_one_graph_and_trains_the_same_steps(tmp_path, monkeypatch):
    # --memory-budget lets the compiler's partitioner recompute activations in the backward: the
    # budget is in force while the row compiles (not the baseline's), the step stays one graph, and
    # the losses are those of the same compiled row saving everything.
    from benchmarks import hf

    seen, time_steps = [], hf.time_steps

    def spying(*args, **kwargs):
        seen.append(torch._functorch.config.activation_memory_budget)
        return time_steps(*args, **kwargs)

    monkeypatch.setattr(hf, "time_steps", spying)
    losses = {}
    for flag in ([], ["--memory-budget", "0.0"]):
        out = tmp_path / f"hf{len(flag)}.json"
        assert main([*TINY, "--arch", "llama", "--kv-heads", "2", "--compile", "--compiled-only",
                     "--max-tokens", "1024", "--methods", "static+packing_varlen", *flag, "--json", str(out)]) == 0
        records = json.loads(out.read_text())
        assert [r["memory_budget"] for r in records] == [None, 0.0 if flag else None]
        assert records[1]["graphs"] == 1 and records[1]["recompiles"] == 0
        losses[bool(flag)] = records[1]["loss"]
    assert seen == [1.0, 1.0, 1.0, 0.0]
    assert torch._functorch.config.activation_memory_budget == 1.0  # restored after the row
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
