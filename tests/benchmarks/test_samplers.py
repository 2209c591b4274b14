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
    assert len(rows) == 5 and all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert len({r["tokens"] for r in rows}) == 1  # every path reads every token once
    saved = [r for r in rows if "state_bytes" in r]
    assert len(saved) == 2 and all(0 < r["state_bytes"] < 10_000 and r["state_us"] > 0 for r in saved)
    assert shards_main(["--data", str(tmp_path / "nothing-{0..1}.tar")]) == 2
