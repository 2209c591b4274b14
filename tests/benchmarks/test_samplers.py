import json

from benchmarks.samplers import main


def test_prints_and_records_every_figure(tmp_path, capsys):
    out = tmp_path / "s.json"
    main(["--docs", "4000", "--plan-docs", "20000", "--buffer-size", "512", "--json", str(out)])
    record = json.loads(out.read_text())
    eff = {r["strategy"]: r["efficiency"] for r in record["efficiency"]}
    assert 0.45 < eff["random batches of 32 padded to max_len"] < 0.55  # the seed article's ~50%
    assert eff["PackingSampler"] > 0.99 and eff["LengthBucketSampler"] > 0.9
    assert {r["sampler"] for r in record["plan_seconds"]} == {"PackingSampler", "LengthBucketSampler"}
    text = capsys.readouterr().out
    assert "PackingSampler" in text and "target" in text


def test_user_error_is_one_line(capsys):
    assert main(["--max-len", "40000"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_shard_throughput_benchmark_runs(tmp_path, capsys):
    from benchmarks.shards import main as shards_main

    out = tmp_path / "t.json"
    assert shards_main(["--docs", "300", "--max-tokens", "4096", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["tokens"] == rows[1]["tokens"]  # both paths read every token once
    assert shards_main(["--data", str(tmp_path / "nothing-{0..1}.tar")]) == 2
