import pytest

from packing.cli import Parser


def test_usage_error_is_one_line_and_exit_2(capsys):
    p = Parser(prog="python -m tool")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "python -m tool: error: argument --n: invalid int value: 'x'\n"


def test_fail_reports_a_caught_error_the_same_way(capsys):
    p = Parser(prog="python -m tool")
    assert p.fail(ValueError("--data 'x' does not exist")) == 2
    assert capsys.readouterr().err == "python -m tool: error: --data 'x' does not exist\n"


def test_command_records_the_arguments_given():
    assert Parser(prog="python -m tool").command(["--n", "3"]) == "python -m tool --n 3"
