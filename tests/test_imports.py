"""The library's shape (issue 23): ``import packing`` pulls in nothing from ``models`` or
``benchmarks``, and no module imports another that imports it back, at any depth, counting imports
inside functions too (the old kernels <-> flash3/flash4 circle was two lazy imports)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("packing", "models", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _executed(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_executed(child)])
            continue
        yield node
        yield from _executed(node)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it names in an import statement, anywhere in it. A parent
    package's __init__ runs first but is already importing by then, so it is not an edge."""
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        is_package = path.name == "__init__.py"
        for node in _executed(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                if base in known:
                    edges.add(base)
                edges |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
        edges.discard(name)
        graph[name] = edges
    return graph


def test_no_import_circle_anywhere():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_library_imports_nothing_from_the_demonstrator_or_the_harness():
    graph = import_graph()
    leaks = {m: sorted(e for e in edges if e.split(".")[0] != "packing")
             for m, edges in graph.items() if m.split(".")[0] == "packing"}
    assert {m: e for m, e in leaks.items() if e} == {}
    # And at run time, every library module at once: nothing of models or benchmarks is loaded.
    names = sorted(m for m in modules() if m.split(".")[0] == "packing" and not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for m in {names!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'benchmarks')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_require_kernels_turns_a_skip_into_a_failure(tmp_path):
    """REQUIRE_KERNELS=fa4 on a machine without FA4: the kernel test fails, naming it, where it would
    skip; and an unknown name is a usage error."""
    test = tmp_path / "test_k.py"
    test.write_text("from kernels_required import skip_unless\n"
                    "def test_k():\n    skip_unless('fa4', False, 'FA4 is not installed here')\n")
    env = {"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"}

    def run(value):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**env, "REQUIRE_KERNELS": value})

    assert "1 skipped" in run("").stdout
    failed = run("quack,fa4")
    assert failed.returncode == 1 and "REQUIRE_KERNELS has fa4, but it does not load: FA4 is not installed here" in failed.stdout
    assert "known kernels: fa3, fa4, fa2, quack, mslk, xformers" in run("fa9").stdout + run("fa9").stderr
