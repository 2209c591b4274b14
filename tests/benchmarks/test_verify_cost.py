import json

import pytest

pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

from benchmarks.verify_cost import main  # noqa: E402


def test_first_use_is_measured_and_the_second_is_read_from_the_cache(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["--config", "Qwen3-0.6B", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["status"] == "exact" and row["cached"] and row["cached_s"] < row["first_use_s"]
    assert "Qwen3-0.6B" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--config", "no-such-config"])
    assert "argument --config: invalid choice: 'no-such-config'" in capsys.readouterr().err


def test_the_cpu_benchmark_runs_both_methods_on_the_same_documents(tmp_path, capsys):
    from benchmarks.hf_cpu import main as cpu_main

    out = tmp_path / "c.json"
    assert cpu_main(["--tokens", "2048", "--layers", "1", "--dim", "64", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows["pad_max"]["tokens"] == rows["packed"]["tokens"] > 1500
    assert rows["pad_max"]["time_ratio"] == 1.0 and rows["packed"]["peak_gib"] >= 0
