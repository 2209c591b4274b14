import json
import subprocess
import sys

from benchmarks.context_balance import contiguous, main


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
