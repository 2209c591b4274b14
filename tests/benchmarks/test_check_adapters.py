import json

from benchmarks.check_adapters import main


def test_cpu_adapters_match_the_reference_and_limits_are_recorded(tmp_path, capsys):
    out = tmp_path / "adapters.json"
    assert main(["--device", "cpu", "--lengths", "1,7,130", "--heads", "2", "--head-dim", "16", "--json", str(out)]) == 0
    records = {(r["adapter"], r["causal"]): r for r in json.loads(out.read_text())}
    assert {a for a, _ in records} == {"sdpa", "sdpa_nested", "flex", "sdpa_docs"}  # flash and xformers need CUDA
    for key in [("sdpa", True), ("sdpa", False), ("sdpa_nested", False), ("sdpa_docs", True), ("sdpa_docs", False)]:
        r = records[key]
        assert r["status"] == "ok" and r["fwd_rel_err"] < 1e-5 and r["bwd_rel_err"] < 1e-5
    assert records[("sdpa_nested", True)]["status"].startswith("unsupported: torch has no causal SDPA kernel")
    flex = records[("flex", True)]
    assert flex["fwd_rel_err"] < 1e-5 and flex["bwd_rel_err"] is None and "backward unsupported" in flex["status"]
    assert "not available on cpu: flash, xformers" in capsys.readouterr().out


def test_exceeding_the_bound_fails(tmp_path):
    out = tmp_path / "adapters.json"
    assert main(["--device", "cpu", "--lengths", "5,9", "--heads", "1", "--head-dim", "8", "--tol", "1e-12",
                 "--json", str(out)]) == 1
    assert any(r["status"] == "FAIL" for r in json.loads(out.read_text()))


def test_bad_lengths_is_one_line(capsys):
    assert main(["--device", "cpu", "--lengths", "4,0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "python -m benchmarks.check_adapters: error: --lengths '4,0' must hold at least one length, each >= 1"
    )


def test_non_integer_lengths_is_one_line(capsys):
    assert main(["--device", "cpu", "--lengths", "3,x"]) == 2
    assert "--lengths '3,x' is not a comma-separated list of ints" in capsys.readouterr().err


def test_a_run_without_json_writes_a_new_file_and_keeps_the_committed_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "benchmarks" / "results" / "adapters.json"
    committed.parent.mkdir(parents=True)
    committed.write_text("[]\n")
    assert main(["--device", "cpu", "--lengths", "3,5", "--heads", "2", "--head-dim", "16"]) == 0
    assert committed.read_text() == "[]\n"  # untouched
    written = sorted(p for p in committed.parent.glob("adapters-cpu-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())
    assert f"records: {written[0].relative_to(tmp_path)}" in capsys.readouterr().out
