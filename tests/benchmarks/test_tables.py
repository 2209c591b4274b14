"""The docs' tables of measured numbers are what ``python -m benchmarks.tables`` makes from the records."""

import json

import pytest

from benchmarks import tables


def test_every_committed_table_is_what_its_records_make():
    assert tables.regenerate(check=True) == [], "run python -m benchmarks.tables and commit the result"


def test_a_table_edited_by_hand_or_a_changed_record_is_caught(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(f"x\n<!-- table:samplers -->\n{tables.samplers()}\n<!-- /table:samplers -->\n")
    monkeypatch.setattr(tables, "PAGES", (page,))
    assert tables.regenerate(check=True) == []
    page.write_text(page.read_text().replace("99.98%", "99.99%", 1))  # a number typed by hand
    assert tables.regenerate(check=True) == [f"{page}: samplers"]
    tables.regenerate(check=False)
    assert "99.98%" in page.read_text() and "99.99%" not in page.read_text()
    record = json.loads((tables.RESULTS / "samplers" / "samplers.json").read_text())
    record["efficiency"][4]["efficiency"] = 0.5  # a re-measured record
    moved = tmp_path / "results"
    moved.mkdir()
    (moved / "samplers").mkdir()
    (moved / "samplers" / "samplers.json").write_text(json.dumps(record))
    monkeypatch.setattr(tables, "RESULTS", moved)
    assert tables.regenerate(check=True) == [f"{page}: samplers"]


def test_unknown_or_unclosed_tables_are_refused(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    monkeypatch.setattr(tables, "PAGES", (page,))
    page.write_text("<!-- table:nope -->\n<!-- /table:nope -->\n")
    with pytest.raises(ValueError, match=r"page.md: unknown table 'nope'; known: headline, seed_h100, seed_h200, static_h200, hf_h100, nested_h100, gpt2_eager_h100, qwen3_same_run, context_balance, context_tiles, context_simulate, context_sweep, samplers, families"):
        tables.regenerate(check=True)
    page.write_text("<!-- table:samplers -->\nno end\n")
    with pytest.raises(ValueError, match=r"no <!-- table:samplers --> ... <!-- /table:samplers --> markers"):
        tables.regenerate(check=True)


def test_the_command_line_checks(capsys):
    assert tables.main(["--check"]) == 0
