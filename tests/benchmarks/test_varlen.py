import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.varlen import main
from models import get_adapter
from packing import COLLATORS

def _mask_loads() -> bool:
    from packing.collate import block_diagonal_mask_class

    try:
        block_diagonal_mask_class()
    except ImportError:
        return False
    return True


# --collate all runs the xformers row only where its mask imports (xformers or mslk: the dev extra).
needs_mask = pytest.mark.skipif(not _mask_loads(), reason="the xformers collator needs xformers or mslk (the dev extra)")

KEYS = {"collate", "attn", "backend", "mode", "device", "gpu", "torch", "preset", "steps", "ms_per_step",
        "tokens_per_s", "padding_fraction", "peak_mem_bytes", "loss", "compile", "world_size"}


@needs_mask
def test_all_collates_see_the_same_documents(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--collate", "all", "--mode", "eval", "--device", "cpu", "--steps", "2", "--warmup", "1",
               "--batch-size", "6", "--seed", "3", "--json", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert [r["collate"] for r in records] == list(COLLATORS)
    assert all(KEYS <= r.keys() for r in records)
    assert records[0]["command"].startswith("python -m benchmarks.varlen --collate all --mode eval")
    # Same documents and weights: the fp32 eval loss agrees across layouts to 1e-5 relative.
    base = records[0]["loss"]
    assert all(abs(r["loss"] - base) / base <= 1e-5 for r in records), [r["loss"] for r in records]
    by = {r["collate"]: r for r in records}
    assert by["concat"]["padding_fraction"] == by["nested"]["padding_fraction"] == 0.0
    assert by["pad_max"]["padding_fraction"] > by["pad_longest"]["padding_fraction"] >= 0
    assert by["pad_max"]["speedup_vs_baseline"] == 1.0
    table = capsys.readouterr().out
    assert "x pad_max" in table and all(name in table for name in COLLATORS)


def test_single_collate_gets_the_baseline_row(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--collate", "concat", "--steps", "1", "--warmup", "0", "--batch-size", "3",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    on_gpu = torch.cuda.is_available()  # defaults follow the device: auto's adapter, preset and dtype
    concat_attn = get_adapter("auto", "packed", "cuda" if on_gpu else "cpu").name  # naive on a CPU
    assert [(r["collate"], r["attn"]) for r in records] == [("pad_max", "sdpa"), ("concat", concat_attn)]
    assert records[0]["device"] == ("cuda" if on_gpu else "cpu")
    assert (records[0]["preset"], records[0]["dtype"]) == (("seed", "bf16") if on_gpu else ("tiny", "fp32"))
    assert records[1]["mode"] == "train" and records[1]["world_size"] == 1 and records[1]["compile"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--collate", "concat", "--attn", "sdpa"], "attention adapter 'sdpa' takes layouts ['padded'], not 'packed'"),
        (["--collate", "nope"], "argument --collate: invalid choice: 'nope'"),
        (["--steps", "0"], "argument --steps: 0 is not >= 1"),
        (["--device", "cuda"] , "--device cuda but torch.cuda.is_available() is False; use --device cpu"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.varlen", *args], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("python -m benchmarks.varlen: error: ")


def test_profile_appends_one_table_per_collate(tmp_path):
    path = tmp_path / "profile.txt"
    assert main(["--collate", "concat", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                 "--profile", str(path)]) == 0
    text = path.read_text()
    assert "## pad_max + sdpa (torch.sdpa), train: 1 steps" in text
    assert "## concat + sdpa_docs (torch.sdpa (documents gathered)), train: 1 steps" in text and "aten::mm" in text


@needs_mask
def test_data_from_shards(tmp_path):
    import numpy as np

    from packing.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "s", vocab_size=259, tokenizer="bytes", shard_size=10) as w:
        for i in range(30):
            w.write(f"d{i}", rng.integers(0, 256, rng.integers(1, 400)).astype(np.uint16))
    out = tmp_path / "r.json"
    spec = str(tmp_path / "s" / "shard-{000000..000002}.tar")
    # On the CPU in fp32 on any machine: the loss agrees across layouts to 1e-5 only in fp32.
    assert main(["--collate", "all", "--mode", "eval", "--data", spec, "--steps", "2", "--warmup", "0",
                 "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(r["data"] == spec for r in records)
    base = records[0]["loss"]
    assert all(abs(r["loss"] - base) / base <= 1e-5 for r in records)
    assert main(["--data", spec, "--steps", "50", "--batch-size", "4"]) == 2  # too few documents: one line


@pytest.mark.parametrize(
    "args, message",
    [(["--fsdp"], "--fsdp shards across ranks: run under torchrun"),
     (["--preset", "nope"], "argument --preset: invalid choice"),
     (["--static"], "--static pads every pack to --max-tokens: it needs --sampler pack, got --sampler fixed"),
     (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead needs --compile")],
)
def test_more_user_errors(args, message, capsys):
    try:
        rc = main(["--device", "cpu", *args])
    except SystemExit as e:  # argparse errors exit directly
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err


def test_sampler_with_too_little_data_says_so(tmp_path, capsys):
    import numpy as np

    from packing.data.shards import ShardWriter

    with ShardWriter(tmp_path / "s", vocab_size=259, tokenizer="bytes") as w:
        for _ in range(6):
            w.write("d", np.ones(100, dtype=np.uint16))
    assert main(["--device", "cpu", "--data", str(tmp_path / "s"), "--sampler", "pack", "--max-tokens", "256",
                 "--steps", "50"]) == 2
    assert "--sampler pack makes 3 batches per rank from these documents; --warmup + --steps needs 52" in capsys.readouterr().err


def test_static_packs_keep_the_loss_and_fix_the_row(tmp_path):
    # Static shapes change the layout's padding, never what is computed on the real tokens.
    out = tmp_path / "r.json"
    common = ["--device", "cpu", "--collate", "concat", "--sampler", "pack", "--max-tokens", "512", "--steps", "2",
              "--warmup", "0", "--no-baseline"]
    assert main([*common, "--json", str(out)]) == 0
    plain = json.loads(out.read_text())[0]
    assert main([*common, "--static", "--max-seqs", "16", "--json", str(out)]) == 0
    static = json.loads(out.read_text())[0]
    assert static["static"] is True and plain["static"] is False
    assert static["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert static["padding_fraction"] >= plain["padding_fraction"]  # rows padded to 512 slots, never fewer


def test_too_long_policy_on_the_command_line(tmp_path, capsys):
    """Issue 22 items 3 and 10: documents over the model's max_len (or --max-tokens) go through
    --too-long; 'error' names the document and points to --too-long split, in one line."""
    import numpy as np

    from packing.data.shards import ShardWriter

    with ShardWriter(tmp_path / "s", vocab_size=259, tokenizer="bytes") as w:
        for n in (40, 300, 700, 90):
            w.write("d", np.ones(n, dtype=np.uint16))
    common = ["--device", "cpu", "--collate", "concat", "--data", str(tmp_path / "s"), "--steps", "1", "--warmup", "0"]
    assert main([*common, "--sampler", "pack", "--max-tokens", "128", "--too-long", "error"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("document 1 has 300 tokens, over --max-tokens 128 (2 such documents); pass "
                                     "--too-long split to cut it into chunks (every token kept)") in err
    assert main([*common, "--too-long", "error"]) == 2  # --sampler fixed: the model's max_len is the limit
    assert "over the model's max_len 256 (2 such documents)" in capsys.readouterr().err
    assert main([*common, "--sampler", "pack", "--max-tokens", "128"]) == 0
    assert "2 documents over --max-tokens 128 split into 9 chunks, no token dropped" in capsys.readouterr().out
    assert main([*common, "--sampler", "pack", "--max-tokens", "128", "--too-long", "truncate"]) == 0
    assert "2 documents over --max-tokens 128 truncated, 744 tokens dropped" in capsys.readouterr().out
    # Synthetic documents too: --max-tokens below the model's max_len splits, where the sampler used
    # to stop with a Python wrapper to write.
    assert main(["--device", "cpu", "--collate", "concat", "--sampler", "pack", "--max-tokens", "64", "--steps", "1",
                 "--warmup", "0"]) == 0
    assert "over --max-tokens 64 split into" in capsys.readouterr().out


@needs_mask
def test_main_job_on_cpu_prints_each_row_as_it_finishes_with_no_torch_noise():
    """Issue 22 item 11: a row per line as it finishes, the kernel each ran, and no torch warning
    (torch's nested_tensor_from_jagged logs its own deprecated is_fx_tracing otherwise)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.varlen", "--collate", "all", "--steps", "1", "--warmup", "0",
                           "--batch-size", "4"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "is_fx_tracing" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("device="))
    assert [l.split(" + ")[0] for l in lines[:header]] == list(COLLATORS)  # each row before the table
    assert "concat + sdpa_docs (torch.sdpa (documents gathered)):" in proc.stdout  # the CPU's packed kernel
