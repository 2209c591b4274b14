import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.cp import main, pack_rows, read_lengths, tails_first
from packing.context import plan_layout
from cli_error import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
LAST = re.compile(r"cp=(\d+) exact: loss rel (\S+), grads rel (\S+); balance max/mean (\S+); padding (\S+)%")


def _check(world: int, lengths: str, tokens: int, tmp_path: Path, *extra: str) -> list[str]:
    """``benchmarks.cp --check`` under torchrun on CPU, fp64, 2 steps: its stdout lines (it must exit 0)."""
    path = tmp_path / "lengths.txt"
    path.write_text(lengths)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
           "benchmarks.cp", "--device", "cpu", "--check", "--lengths", str(path), "--tokens", str(tokens), "--steps", "2",
           *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout.strip().splitlines()


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_check_under_torchrun_is_exact_at_every_world_size(world, tmp_path):
    lines = _check(world, "5 1 64\n3 29 1 1 17\n", 70, tmp_path)  # two rows of 70 and 51 tokens: a cut document in each
    assert lines[0] == f"2 rows of up to 70 tokens, 8 documents; N={world}, fp64 on cpu"
    assert len([line for line in lines if line.startswith("attention (")]) == 4
    match = LAST.fullmatch(lines[-1])
    assert match, lines[-1]
    assert int(match[1]) == world and float(match[2]) <= 1e-10 and float(match[3]) <= 1e-10
    assert 1.0 <= float(match[4]) < 2.0 and float(match[5]) == 0.0  # nothing padded, measured


def test_check_with_documents_cut_over_the_fewest_ranks_is_exact(tmp_path):
    # --spread fewest at N = 4: the 40-token document over 3 ranks, the 30 and the 20 over 2 each;
    # the ranks' cut tokens differ, and the all-gather moves each rank's own count, unpadded.
    lines = _check(4, "40 30 20 10 10 10\n", 120, tmp_path, "--spread", "fewest")
    assert lines[0] == "1 rows of up to 120 tokens, 6 documents; N=4, fp64 on cpu, cut documents over the fewest ranks"
    match = LAST.fullmatch(lines[-1])
    assert match and float(match[2]) <= 1e-10 and float(match[3]) <= 1e-10, lines[-1]
    assert float(match[5]) == 0.0
    layout = plan_layout([40, 30, 20, 10, 10, 10], 4, spread="fewest")
    assert [layout.split_len(r) for r in range(4)] == [23, 24, 23, 20]


def test_simulate_times_every_rank_and_the_whole_row(tmp_path, capsys):
    lengths, out = tmp_path / "l.txt", tmp_path / "s.json"
    lengths.write_text("\n".join(["300", "7", "1", "120", "33"]))
    assert main(["--simulate", "3", "--lengths", str(lengths), "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--repeats", "1", "--split-fraction", "0.5", "4", "--spread", "all", "fewest", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["world_size"] == 3 and record["tokens"] == 461 and record["whole_row_ms"] > 0
    assert [r["layout"] for r in record["layouts"]] == [
        "contiguous", "head-tail, split fraction 0.5", "head-tail, split fraction 4",
        "head-tail over the fewest ranks, split fraction 0.5", "head-tail over the fewest ranks, split fraction 4"]
    for result in record["layouts"]:
        assert sum(result["rank_tokens"]) == 461 and len(result["rank_ms"]) == 3 and result["max_over_mean"] >= 1.0
    # contiguous cuts at 153 and 307: only the 300-token document (307 is where the 7 ends); head-tail
    # at 0.5 cuts the 300 and the 120 (each over half a rank's share of ~156 tokens' work), at 4 nothing
    assert [r["cut_documents"] for r in record["layouts"]] == [1, 2, 0, 2, 0]
    # both spreads all-gather the two cut documents' 420 tokens and nothing more (over the fewest
    # ranks, the 120 goes to two of the three, and the third sends 60 tokens fewer, unpadded)
    cut = pytest.approx(100 * 420 / 461)
    assert [r["gathered_pct"] for r in record["layouts"][1:]] == [cut, 0, cut, 0]
    assert record["device"] == "cpu" and record["torch"] and record["command"].startswith("python -m benchmarks.cp --simulate 3")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"cp=3 simulated: max/mean \S+; slowest x N / whole row \S+ \(contiguous: \S+, \S+\)", last)


def test_simulate_times_aligned_cuts_and_tails_first(tmp_path):
    # --align 1 16: the 300-token document in 6 chunks at 0, 50, 100, ... or at multiples of 16
    # (0, 48, 96, 144, 208, 256); --order tails-first: the same chunks, each rank's tail before its head.
    lengths, out = tmp_path / "l.txt", tmp_path / "s.json"
    lengths.write_text("300 7 1 120 33")
    assert main(["--simulate", "3", "--lengths", str(lengths), "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
                 "--repeats", "1", "--align", "1", "16", "--order", "planned", "tails-first", "--json", str(out)]) == 0
    layouts = json.loads(out.read_text())["layouts"]
    assert [r["layout"] for r in layouts] == [
        "contiguous", "head-tail, split fraction 0.5, cut at any token",
        "head-tail, split fraction 0.5, cut at any token, tails first",
        "head-tail, split fraction 0.5, aligned to 16", "head-tail, split fraction 0.5, aligned to 16, tails first"]
    assert layouts[1]["rank_tokens"] == layouts[2]["rank_tokens"] and layouts[3]["rank_tokens"] == layouts[4]["rank_tokens"]
    assert layouts[1]["rank_tokens"] != layouts[3]["rank_tokens"]  # the aligned cuts move tokens between ranks
    layout = plan_layout([300, 7, 1, 120, 33], 3, align=16)
    assert sorted(c.start for rank in layout.chunks for c in rank if c.block == 0) == [0, 48, 96, 144, 208, 256]
    assert [c.start for c in tails_first(layout).chunks[0] if c.split] == \
        [c.start for c in layout.chunks[0] if c.split][::-1]


def test_simulate_with_a_kernel_also_times_the_kernel_alone(tmp_path, monkeypatch):
    # A kernel written out (bottom-right causal, the chunks' own boundaries) stands in for a GPU's.
    sys.path.insert(0, str(ROOT / "tests" / "packing"))
    import benchmarks.cp as cp
    from test_context_exact import bottom_right

    monkeypatch.setattr(cp, "chunk_kernel", lambda *a, **k: ("written out", bottom_right))
    lengths, out = tmp_path / "l.txt", tmp_path / "s.json"
    lengths.write_text("300 7 1 120 33")
    assert main(["--simulate", "2", "--lengths", str(lengths), "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--repeats", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kernel"] == "written out" and record["whole_row_kernel_ms"] > 0
    for result in record["layouts"]:
        assert len(result["rank_kernel_ms"]) == 2 and result["kernel_max_over_mean"] >= 1.0
        assert result["kernel_sum_over_whole"] > 0


@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_contiguous_baseline_is_exact_per_document(world):
    # The baseline does the same work as the head-tail layout: each rank's chunks against their
    # documents' prefixes, fp64, against each document alone (forward and the gradients).
    from benchmarks.cp import contiguous_layout, document_attention
    from packing import get_collator
    from packing.context import batch_blocks, shard, unshard
    from packing.context.attention import attend_chunks, simulated_keys
    from packing.context.shard import local_index

    lens = [300, 7, 1, 120, 33]
    batch = get_collator("concat")([[0] * n for n in lens])
    layout = contiguous_layout(batch_blocks(batch), world)
    assert [layout.local_len(r) for r in range(world)] == [(r + 1) * 461 // world - r * 461 // world for r in range(world)]
    g = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(461, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    want = document_attention(q, k, v, lens, causal=True)[0]
    want.backward(d_out)
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    outs = []
    for r in range(world):
        part = shard(batch, layout, r)
        idx = local_index(layout, r)
        outs.append(attend_chunks(q[idx], k[idx], v[idx], simulated_keys(k, v, part.context), part, causal=True)[None])
    got = unshard(outs, layout)[0]
    got.backward(d_out)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    for t, w in zip((q, k, v), want_grads):
        assert torch.allclose(t.grad, w, rtol=0, atol=1e-12)


def test_check_on_cuda_without_a_gpu_is_one_line_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "benchmarks.cp", "--check", "--device", "cuda"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "WORLD_SIZE": "1"})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith("python -m benchmarks.cp: error: --check --device cuda, but no CUDA device is visible; "
                                 "use --device cpu (fp64, gloo)")


def test_simulate_refuses_a_row_shorter_than_its_ranks(tmp_path):
    lengths = tmp_path / "l.txt"
    lengths.write_text("2 1")
    from benchmarks.cp import simulate
    from benchmarks.harness import Parser

    with pytest.raises(ValueError, match=r"the row has 3 tokens, fewer than --simulate 4 ranks; give longer --lengths"):
        simulate(type("Args", (), {"device": "cpu", "simulate": 4, "lengths": str(lengths), "dtype": None})(), Parser())


def test_lengths_are_read_as_positive_ints_only(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("3 4\n5\n")
    assert read_lengths(str(f)) == [3, 4, 5]
    assert pack_rows([3, 4, 5, 2], 8) == [[3, 4], [5, 2]]
    for text, message in [("3 x 5", r"entry 2 is 'x'"), ("3 0", r"entry 2 is '0'"), ("3 -1", r"entry 2 is '-1'"),
                          ("", r"no lengths")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_lengths(str(f))
    f.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"cannot read it as text"):
        read_lengths(str(f))
    with pytest.raises(ValueError, match=r"a document of 9 tokens is longer than a row \(--tokens 8\); raise --tokens"):
        pack_rows([3, 9], 8)


@pytest.mark.parametrize("args, message", [
    (["--simulate", "0"], "--simulate is 0; expected an int >= 1"),
    (["--simulate", "2", "--heads", "6", "--kv-heads", "4"], "--heads 6 is not a multiple of --kv-heads 4"),
    (["--check"], "--check runs under torchrun: torchrun --nproc-per-node N -m benchmarks.cp --device cpu --check"),
    (["--check", "--device", "cuda"], "--check runs under torchrun: torchrun --nproc-per-node N -m benchmarks.cp --device cuda --check"),
    (["--simulate", "2", "--lengths", "/nonexistent/l.txt"], "--lengths /nonexistent/l.txt: cannot read it as text"),
    (["--simulate", "2", "--kernel", "no-such-kernel"], "--kernel no-such-kernel does not load here; loaded: "),
    (["--simulate", "2", "--split-fraction", "0"], "--split-fraction 0 is out of range; expected a number > 0"),
    (["--simulate", "2", "--area-cost", "-1"], "--area-cost -1 is out of range; expected a finite number >= 0"),
    (["--check", "--spread", "all", "fewest"], "--spread all fewest: --check takes one; run it once for each"),
    (["--check", "--align", "1", "128"], "--align 1 128: --check takes one; run it once for each"),
    (["--simulate", "2", "--align", "0"], "--align 0 is out of range; expected an int >= 1 (1 cuts at any token)"),
    (["--simulate", "2", "--profile", "p"], "--profile p profiles the GPU's kernels of --simulate on --device cuda; drop it"),
])
def test_a_user_error_is_one_line_and_exit_2(args, message):
    assert_one_line_error("benchmarks.cp", args, message)
