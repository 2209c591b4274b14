import pathlib
import re

import torch
import torch._dynamo

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README lost its python examples"
    first: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), first)  # the DataLoader example
    assert first["batch"].layout == "packed"
    assert any(p.grad is not None for p in first["model"].parameters())
    second: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), second)  # the sampler example
    assert second["batch"].num_tokens <= 16384 and second["sampler"].epoch == 1
    third: dict = {}
    torch._dynamo.reset()  # earlier tests compiled the same model class: start from no compilation
    with torch._dynamo.config.patch(error_on_recompile=True):  # the compiled recipe compiles once
        exec(compile(blocks[2], "README.md", "exec"), third)  # the transformers example
    assert "cu_seq_lens_q" in third["kwargs"] and third["model"].config._attn_implementation == "packing_varlen"
    assert third["kwargs"]["input_ids"].shape == (1, 2048) and third["kwargs"]["max_length_q"] == 256


def test_readme_commands_are_the_ci_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    for command in ('pip install torch==2.13.0 -e ".[dev]"', "python -m pytest -q"):
        assert command in text and command in ci


def test_readme_layout_names_every_module():
    # The layout section is how a newcomer finds a concept: every library module is in it, and
    # nothing it names is missing from the tree.
    text = README.read_text()
    layout = text[text.index("## Repository layout"):]
    named = set(re.findall(r"([A-Za-z_0-9]+\.py)", layout))
    root = README.parent
    files = {p.name for d in ("packing", "models", "benchmarks") for p in (root / d).rglob("*.py")}
    files -= {"__init__.py"}
    assert files - named == set(), "modules missing from the README layout"
    assert named - files - {"__init__.py", "equivalence.py"} == set(), "README layout names files that do not exist"
