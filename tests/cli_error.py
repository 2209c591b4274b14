"""A benchmark command's user error, run as a user would: one line on stderr and exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def assert_one_line_error(module: str, args: list[str], message: str, env: dict | None = None) -> None:
    """Run ``python -m module *args`` outside torchrun with no GPU visible, and check that it exits 2 with one
    stderr line that starts ``python -m module: error: message``.

    Example: ``assert_one_line_error("benchmarks.cp", ["--simulate", "2", "--split-fraction", "0"],
    "--split-fraction 0 is out of range")``.
    """
    base = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | {"CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                         env=base | (env or {}))
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
    assert run.stderr.startswith(f"python -m {module}: error: {message}"), run.stderr
