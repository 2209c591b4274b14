import json
import subprocess
import sys

import numpy as np
import pytest

from packing.report import main


def test_synthetic_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the report extra")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["--synthetic", "5000", "--json", str(out), "--plot", str(png)]) == 0
    record = json.loads(out.read_text())
    assert record["documents"] == 5000 and record["real_tokens"] > 0
    names = [s["name"] for s in record["strategies"]]
    assert names == ["pad_max", "pad_longest", "bucket", "pack"]
    keys = {"name", "efficiency", "padding_fraction", "attention_efficiency", "batches", "real_tokens", "computed_tokens"}
    assert all(keys <= s.keys() for s in record["strategies"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "pad_max" in capsys.readouterr().out


def test_lengths_file_text_and_npy(tmp_path):
    txt, npy, out = tmp_path / "l.txt", tmp_path / "l.npy", tmp_path / "r.json"
    txt.write_text("3\n1\n\n4\n2000\n")
    assert main(["--lengths", str(txt), "--too-long", "truncate", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["documents"] == 4 and record["long"]["truncated_tokens"] == 2000 - 1024
    np.save(npy, np.array([3, 1, 4]))
    assert main(["--lengths", str(npy), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["real_tokens"] == 8


def test_shards_input(tmp_path):
    from packing.data.shards import ShardWriter

    with ShardWriter(tmp_path / "s", vocab_size=259, tokenizer="bytes", shard_size=3) as w:
        for n in (5, 7, 9, 11):
            w.write("d", np.ones(n, dtype=np.uint16))
    out = tmp_path / "r.json"
    assert main(["--shards", str(tmp_path / "s" / "shard-{000000..000001}.tar"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["real_tokens"] == 32


def run(*args):
    return subprocess.run([sys.executable, "-m", "packing.report", *args], capture_output=True,
                          text=True, timeout=120)


def test_non_integer_line_names_the_line(tmp_path):
    bad = tmp_path / "l.txt"
    bad.write_text("3\n4\nabc\n5\n")
    proc = run("--lengths", str(bad))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "python -m packing.report: error: line 3 of l.txt is 'abc', not an integer length"]


def test_empty_input_is_a_clear_error(tmp_path):
    empty = tmp_path / "l.txt"
    empty.write_text("\n")
    proc = run("--lengths", str(empty))
    assert proc.returncode == 2 and f"--lengths '{empty}' holds no lengths" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_more_input_errors(tmp_path, capsys):
    assert main(["--lengths", str(tmp_path / "missing.txt")]) == 2
    assert "--lengths" in capsys.readouterr().err
    two_d = tmp_path / "l.npy"
    np.save(two_d, np.ones((2, 2), dtype=np.int64))
    assert main(["--lengths", str(two_d)]) == 2
    assert "holds int64 of shape (2, 2); expected 1-D integers" in capsys.readouterr().err
    assert main(["--synthetic", "0"]) == 2
    assert "--synthetic needs N >= 1" in capsys.readouterr().err
