import json

import pytest

from benchmarks.shard_checks import main


def test_both_readers_read_every_row_and_each_ratio_is_against_the_baseline(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["--baseline", "HEAD", "--runs", "1", "--docs", "200", "--open-shards", "20", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and {r["reader"] for r in rows} == {"baseline", "this tree"}
    for row in rows:
        assert row["median"] > 0 and len(row["runs"]) == 1
        assert row["ratio"] == (1.0 if row["reader"] == "baseline" else pytest.approx(
            row["median"] / next(b["median"] for b in rows if b["case"] == row["case"] and b["reader"] == "baseline")))
    assert "read stream" in capsys.readouterr().out


def test_user_errors_are_one_line(capsys):
    assert main(["--baseline", "no-such-commit"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'no-such-commit' could not be extracted with git archive" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit:
        main(["--runs", "0"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --runs: 0 is not >= 1" in err
