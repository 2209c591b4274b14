import json
import subprocess
import sys

from benchmarks.context_balance import contiguous, main, tiles, whole_tiles
from packing.context import plan_layout


def test_the_records_compare_the_layout_with_a_contiguous_split(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--dim", "1024", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["world_size"], r["docs"] == 1) for r in records] == [(w, one) for one in (True, False) for w in (2, 4, 8)]
    single = [r for r in records if r["docs"] == 1]
    # One causal document split into N equal pieces: the last piece sees (2N-1)/N of the mean area.
    assert [round(r["contiguous_attention_max_over_mean"], 3) for r in single] == [1.5, 1.75, 1.875]
    assert all(r["layout_work_max_over_mean"] <= 1.001 and r["cut_documents"] == 1 for r in single)
    assert all(r["command"] == f"python -m benchmarks.context_balance --dim 1024 --json {out}" for r in records)
    assert "log-normal mix" in capsys.readouterr().out


def test_a_contiguous_split_counts_each_token_once():
    work = contiguous([5, 3, 8], 4, area_only=False, area_cost=0.0)
    assert work == [4.0, 4.0, 4.0, 4.0]


def test_a_bad_width_is_one_line_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "benchmarks.context_balance", "--dim", "0"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == "python -m benchmarks.context_balance: error: --dim is 0; expected a model width >= 1"


def test_tiles_count_the_causal_blocks_a_tiled_kernel_reads():
    # One 300-token document, tiles of 128: query tiles 0-127, 128-255, 256-299 read 1, 2, 3 key tiles.
    assert whole_tiles([300], 128) == 6 and whole_tiles([300, 5], 128) == 7
    # 1,600 tokens (13 query tiles: 1 + 2 + ... + 13 = 91) cut over 3 ranks at 266, 533, ...: ragged query
    # tiles meeting the diagonal mid-tile, 136 tiles; at 256, 512, ... (align=128), the whole document's 91.
    assert whole_tiles([1600], 128) == 91
    ragged, aligned = plan_layout([1600], 3, split_tokens=1, align=1), plan_layout([1600], 3, split_tokens=1)
    assert sum(tiles(ragged, r, 128) for r in range(3)) == 136
    assert sum(tiles(aligned, r, 128) for r in range(3)) == 91
    assert [tiles(plan_layout([300], 1), 0, t) for t in (128, 1)] == [6, 300 * 301 // 2]  # tile 1: the causal area


def test_align_puts_the_mix_on_tile_edges(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--spread", "all", "fewest", "--align", "1", "128", "--json", str(out)]) == 0
    records = {(r["docs"] == 1, r["world_size"], r["spread"], r["align"]): r for r in json.loads(out.read_text())}
    assert len(records) == 2 * 3 * 2 * 2
    for spread in ("all", "fewest"):
        mix1, mix128 = records[False, 8, spread, 1], records[False, 8, spread, 128]
        assert mix128["tiles_slowest_x_n_over_whole"] < mix1["tiles_slowest_x_n_over_whole"]
        assert mix128["tiles_sum_over_whole"] <= mix1["tiles_sum_over_whole"]
    assert all(round(records[True, n, s, a]["tiles_slowest_x_n_over_whole"], 3) == 1.0
               for n in (2, 4, 8) for s in ("all", "fewest") for a in (1, 128))


def test_a_bad_align_or_tile_is_one_line_and_exit_2():
    for flag, message in (("--align", "--align 0 is out of range; expected an int >= 1 (tokens)"),
                          ("--tile", "--tile 0 is out of range; expected an int >= 1 (tokens)")):
        run = subprocess.run([sys.executable, "-m", "benchmarks.context_balance", flag, "0"], capture_output=True,
                             text=True)
        assert run.returncode == 2
        assert run.stderr.strip() == f"python -m benchmarks.context_balance: error: {message}"
