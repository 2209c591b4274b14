import json

from benchmarks.samplers import main


def test_prints_and_records_every_figure(tmp_path, capsys):
    out = tmp_path / "s.json"
    main(["--docs", "4000", "--plan-docs", "20000", "--buffer-size", "512", "--json", str(out)])
    record = json.loads(out.read_text())
    eff = {r["strategy"]: r["efficiency"] for r in record["efficiency"]}
    assert 0.45 < eff["random batches padded to max_len"] < 0.55  # the seed article's ~50%
    assert eff["PackingSampler"] > 0.99 and eff["LengthBucketSampler"] > 0.9
    assert {r["sampler"] for r in record["plan_seconds"]} == {"PackingSampler", "LengthBucketSampler"}
    text = capsys.readouterr().out
    assert "PackingSampler" in text and "target" in text


def test_user_error_is_one_line(capsys):
    assert main(["--max-len", "40000"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
