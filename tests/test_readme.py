import pathlib
import re

import pytest
import torch
import torch._dynamo

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def run_block(block: str, capsys) -> tuple[dict, str]:
    """Run a README python block as a user pastes it; its namespace and what it printed."""
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace, capsys.readouterr().out


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 4, "README's quickstarts: the DataLoader, the sampler, transformers compiled, streaming"
    first, out = run_block(blocks[0], capsys)  # the DataLoader example
    assert first["batch"].layout == "packed"
    assert any(p.grad is not None for p in first["model"].parameters())
    # What the README says it prints: every slot a real token, a loss near ln(1024).
    m = re.fullmatch(r"packed batch: 32 documents, (\d+) tokens in (\d+) slots; loss (\d+\.\d+)\n", out)
    assert m and m[1] == m[2] and abs(float(m[3]) - 6.93) < 0.3, out
    second, out = run_block(blocks[1], capsys)  # the sampler example
    assert second["batch"].num_tokens <= 16384 and second["sampler"].epoch == 1
    assert out == "epoch 0: 66 packs of at most 16384 tokens, 1,072,796 tokens in all; 0 documents dropped\n" \
                  "epoch 1: 66 packs of at most 16384 tokens, 1,072,796 tokens in all; 0 documents dropped\n"
    assert "`66 packs of at most 16384 tokens, 1,072,796 tokens in all; 0 documents dropped`" in README.read_text()
    pytest.importorskip("transformers", reason="the transformers example needs the hf extra")
    torch._dynamo.reset()  # earlier tests compiled the same model class: start from no compilation
    with torch._dynamo.config.patch(error_on_recompile=True):  # the compiled recipe compiles once
        third, out = run_block(blocks[2], capsys)  # the transformers example
    assert "cu_seq_lens_q" in third["kwargs"] and third["model"].config._attn_implementation == "packing_varlen"
    assert third["kwargs"]["input_ids"].shape == (1, 2048) and third["kwargs"]["max_length_q"] == 256
    m = re.fullmatch(r"5 packs of shape \(1, 2048\); last loss (\d+\.\d+)\n", out)
    assert m and abs(float(m[1]) - 6.93) < 0.3, out


def test_readme_streaming_recipe_runs_as_written_on_a_first_run_and_resumes(tmp_path, monkeypatch, capsys):
    """Issue 22 item 13: the recipe failed with FileNotFoundError: loader.pt before any state was
    saved. Run as written in a directory with shards/ (and a document longer than the budget, which
    the recipe splits): a first run, then a second that resumes at the epoch's end."""
    import numpy as np
    pytest.importorskip("torchdata", reason="the stream extra: pip install -e '.[stream]'")
    from packing.data.shards import ShardWriter

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "restore_loader" in b)
    rng = np.random.default_rng(0)
    lengths = [40_000] + rng.integers(1, 3000, 199).tolist()  # one document over max_tokens=16384
    with ShardWriter(tmp_path / "shards", vocab_size=259, tokenizer="bytes", shard_size=50) as w:
        for i, n in enumerate(lengths):
            w.write(f"d{i}", rng.integers(0, 256, n).astype(np.uint16))
    monkeypatch.chdir(tmp_path)
    _, out = run_block(block, capsys)
    m = re.fullmatch(r"resumed=False: (\d+) packs, ([\d,]+) tokens; \{'documents': 200, 'chunks': 202, 'split': 1, "
                     r"'truncated': 0, 'dropped_tokens': 0\}\n", out)
    assert m and int(m[2].replace(",", "")) == sum(lengths), out  # every token, the long document's included
    _, out = run_block(block, capsys)
    assert out.startswith("resumed=True: 0 packs, 0 tokens;"), out


def test_readme_commands_are_the_ci_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    for command in ('pip install torch==2.13.0 -e ".[dev]"', "python -m pytest\n"):
        assert command in text and command in ci


def test_readme_layout_names_every_module():
    # The layout section is how a newcomer finds a concept: every library module is in it, and
    # nothing it names is missing from the tree.
    layout = (DOCS / "layout.md").read_text()
    named = set(re.findall(r"([A-Za-z_0-9]+\.py)", layout))
    root = README.parent
    files = {p.name for d in ("packing", "models", "benchmarks") for p in (root / d).rglob("*.py")}
    files -= {"__init__.py"}
    assert files - named == set(), "modules missing from the README layout"
    assert named - files - {"__init__.py", "equivalence.py"} == set(), "README layout names files that do not exist"


def test_readme_data_example_prints_what_it_says(capsys):
    # A transformers-tokenized dataset, padded and prompt-masked, through the sampler and collator:
    # the printed output is the README's, line for line.
    pytest.importorskip("datasets", reason="the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
    text = (DOCS / "guides" / "data.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "ByT5Tokenizer" in b)
    namespace, out = run_block(block, capsys)
    shown = text[text.index(block):]
    shown = shown[shown.index("It prints:\n\n```\n") + len("It prints:\n\n```\n"):]
    assert out == shown[: shown.index("```")]
    assert namespace["batch"].num_tokens == 72 and namespace["batch"].num_slots == 72


def test_readme_trl_example_trains_on_packed_rows(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl", reason="the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("datasets", reason="the dev extra: pip install -e '.[dev]'")
    guide = (DOCS / "guides" / "transformers.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "SFTTrainer" in b)
    monkeypatch.chdir(tmp_path)  # its output_dir
    namespace, out = run_block(block, capsys)
    m = re.search(r"\n3 steps on packed rows; loss (\d+\.\d+)\n$", out)
    assert m and abs(float(m[1]) - 5.95) < 0.5, out
    assert "3 steps on packed rows; loss 6.0" in guide
    assert type(namespace["trainer"].data_collator).__name__ == "HFPacking"


# Every python block of the README and the guides, by a line it alone holds, and the test that runs it.
TESTED_BY = {
    "loader = DataLoader(SyntheticDocs(256": "test_readme_examples_run",
    "sampler = PackingSampler(docs.lengths, max_tokens=16384, seed=0)": "test_readme_examples_run",
    'packed = pack(model, static={"total_tokens": 2048': "test_readme_examples_run",
    "resumed = restore_loader(loader, \"loader.pt\")": "test_readme_streaming_recipe_runs_as_written_on_a_first_run_and_resumes",
    "tok = transformers.ByT5Tokenizer()  # one token per byte": "test_readme_data_example_prints_what_it_says",
    "trainer = trl.SFTTrainer(": "test_readme_trl_example_trains_on_packed_rows",
    "collate = ContextCollator(packed.collator, world_size=cp_size, rank=cp_rank)":
        "test_context_parallel_example_runs_under_torchrun_as_one_process",
    "from models import GPT, GPTConfig, lm_loss\nfrom packing import get_collator\nfrom packing.context import ContextCollator":
        "test_context_parallel_toy_gpt_example_prints_what_the_guide_says",
}


def _guide_block_under_torchrun(tmp_path, marker):
    """The distributed guide's python block holding ``marker``, run as written on 2 gloo ranks from
    the repository root: (the block, its stdout, the text block the guide says it prints)."""
    import os
    import subprocess
    import sys

    text = (DOCS / "guides" / "distributed.md").read_text()
    block, printed = next((b, p) for b, p in re.findall(r"```python\n(.*?)```\n\nprints\n\n```text\n(.*?)```", text, re.S)
                          if marker in b)
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return block, proc.stdout, printed


def test_context_parallel_example_runs_under_torchrun_as_one_process(tmp_path):
    # The guide's transformers block: the loss it prints is the one the guide pins, and the model's
    # loss on the whole row in one process.
    pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
    block, out, printed = _guide_block_under_torchrun(tmp_path, "ContextCollator(packed.collator")
    assert out.strip() == printed.strip()
    one = block.split("packed = pack(model)")[0].replace('dist.init_process_group("gloo")', "").replace(
        "cp_group, cp_size, cp_rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()", "")
    namespace: dict = {}
    exec(compile(one + "from packing.interop.hf import pack\nloss = model(**pack(model)(samples)).loss\n", "one", "exec"),
         namespace)
    assert out.strip().splitlines()[-1] == f"loss {namespace['loss'].item():.4f}"


def test_context_parallel_toy_gpt_example_prints_what_the_guide_says(tmp_path):
    # The guide's toy GPT block: 2 ranks' loss and the whole row's, printed as the guide pins them.
    _, out, printed = _guide_block_under_torchrun(tmp_path, "from models import GPT, GPTConfig, lm_loss")
    assert out.strip() == printed.strip()
    *_, cp, whole = re.fullmatch(r"ranks hold \[(\d+), (\d+)\] tokens\nloss on 2 ranks (\S+), whole row (\S+)",
                                 out.strip()).groups()
    assert cp == whole


def test_every_python_block_in_the_readme_and_the_guides_is_run_by_a_test():
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    blocks = [(page.name, b) for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    assert len(blocks) >= len(TESTED_BY)
    for name, block in blocks:
        runs = [test for marker, test in TESTED_BY.items() if marker in block]
        assert len(runs) == 1, f"a python block in {name} is run by no test (or by several): {block[:120]!r}"
        assert runs[0] in globals(), runs[0]
    assert {test for _, b in blocks for m, test in TESTED_BY.items() if m in b} == set(TESTED_BY.values())


def test_the_docs_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or a docstring the API reference
    cannot render fails here (and so in CI)."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra: pip install -e '.[docs]'")
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "assets" / "padding_report.png").is_file()
    api = (tmp_path / "site" / "reference" / "transformers" / "index.html").read_text()
    assert "packing.interop.hf.pack" in api


def test_readme_is_a_landing_page():
    assert len(README.read_text().splitlines()) <= 250
