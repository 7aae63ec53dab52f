"""The layout's promises: the library never loads benchmarks/ or experiments/, imports without matplotlib, has
no import cycles between its modules, and no function longer than ~100 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import salr

SRC = Path(salr.__file__).resolve().parent
MAX_FUNCTION_LINES = 100


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        names.append(".".join(parts))
    return names


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_every_module_imports_without_benchmarks_or_experiments():
    code = f"""
import importlib, sys
for name in {_modules()!r}:
    if name != "salr.ops.triton":  # imports triton; checked by its own tests
        importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("benchmarks", "experiments", "paper_grid"))
assert not leaked, leaked
print("ok")
"""
    result = _run(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_import_salr_without_matplotlib():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("matplotlib blocked for this test")
sys.meta_path.insert(0, Block())
import salr, salr.theory, salr.commands.theory, salr.cli
print("ok")
"""
    result = _run(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _module_level_imports(path: Path, module: str) -> set[str]:
    """salr modules imported at module level (not inside functions: those are lazy by design)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else f"{package.rsplit('.', node.level - 1)[0]}.{node.module}"
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "salr"}


def test_no_import_cycles_between_library_modules():
    modules = _modules()
    paths = {name: SRC.parent / Path(*name.split(".")) for name in modules}
    graph = {}
    for name, base in paths.items():
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        graph[name] = {m for m in _module_level_imports(path, name) if m in paths and m != name}
    # a package's __init__ importing its own submodules is how packages re-export; not a cycle of concern
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_function_over_100_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({lines} lines)")
    assert not long, long
