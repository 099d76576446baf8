"""The package's rooms as its imports draw them: no cycle, targets behind the registry, families in the adapters.

Imports are read from the source (ast), those made inside functions included: a late import
hides a cycle from Python, not from the next engineer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# installed package -> folder in the repository (pyproject.toml's package-dir)
ROOTS = {"moeexport": REPO / "moeexport", "moeexport.backends": REPO / "backends",
         "moeexport.calibration": REPO / "calibration"}
# what the core may import of backends/: the registry, the target contract and the target-neutral runtime helpers
CORE_MAY_IMPORT = {"moeexport.backends", "moeexport.backends.target", "moeexport.backends.profile",
                   "moeexport.backends.decoding"}


def package_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports anywhere in its file (`from a import b` counts a.b when b is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {module for module in found if module in known and module != name}


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{parent}.{node.module}" if node.module else parent


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_late_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_imports_inside_functions_are_counted(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from moeexport import pipeline\n")
    assert imported_modules("moeexport.late", module, {"moeexport.pipeline"}) == {"moeexport.pipeline"}


def test_the_core_reaches_a_target_only_through_the_registry():
    """Nothing outside backends/ imports a target's package: it asks `moeexport.backends` for the target."""
    graph = import_graph()
    core = [name for name in graph if not name.startswith(("moeexport.backends", "moeexport.calibration"))]
    offenders = {name: sorted(module for module in graph[name]
                              if module.startswith("moeexport.backends") and module not in CORE_MAY_IMPORT)
                 for name in core}
    assert {name: modules for name, modules in offenders.items() if modules} == {}


def test_only_the_adapters_name_model_families():
    """Passes, calibration, backends and the core talk to adapters, never to a family.

    A backend's architectures.py is its one table from model_type to the format's host.
    """
    pattern = re.compile(r"mixtral|qwen|olmoe|deepseek|gpt_oss|glm4|ernie|gemma|nemotron|block_sparse_moe", re.IGNORECASE)
    modules = package_modules()
    files = [path for name, path in modules.items()
             if not name.startswith("moeexport.adapters") and path.name != "architectures.py"]
    offenders = sorted(str(path.relative_to(REPO)) for path in files if pattern.search(path.read_text()))
    assert offenders == []
