"""Old module paths keep working after the move into subpackages, with a warning naming the new one."""

import importlib
import subprocess
import sys

import pytest

from packing._moved import MOVED


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_path_is_the_new_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=f"{old} moved to {new}; import that instead"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # the same classes and registrations, not a copy
    assert module.__spec__.name == new  # the module keeps its own identity
    sys.modules.pop(old, None)


def test_python_dash_m_on_an_old_path_runs_the_new_command():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.padding_report", "--synthetic", "50"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pack" in proc.stdout and "benchmarks.padding_report moved to packing.report" in proc.stderr
