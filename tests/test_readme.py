import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["batch"].layout == "packed"
    assert any(p.grad is not None for p in scope["model"].parameters())


def test_readme_commands_are_the_ci_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    for command in ('pip install torch==2.13.0 -e ".[dev]"', "python -m pytest -q"):
        assert command in text and command in ci
