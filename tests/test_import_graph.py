"""The import graph of goat_hf's modules has no cycle, and lower floors never import higher ones (STYLE §13).

Imports are read with ast, including those inside functions, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "goat_hf"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """goat_hf modules that `path` imports anywhere in its code (`from . import x` counts as importing x)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import adapter_io` imports the module, `from . import x` the package
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(path, root) for path in paths}
    return {module_name(path, root): imported_modules(path, modules, root) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_goat_hf_has_no_import_cycle():
    graph = import_graph()
    assert {"goat_hf.adapter_io", "goat_hf.hub", "goat_hf.model_card", "goat_hf.trainer"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_submodule_imports_the_package_init():
    importers = sorted(module for module, targets in import_graph().items() if "goat_hf" in targets)
    assert importers == [], f"{importers} import the package __init__; take __version__ from goat_hf.version"


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("goat_hf.adapter_io", "goat_hf.hub"),
        ("goat_hf.adapter_io", "goat_hf.model_card"),
        ("goat_hf.adapter_io", "goat_hf.trainer"),
        ("goat_hf.model", "goat_hf.adapter_io"),
        ("goat_hf.layer", "goat_hf.model"),
        ("goat_hf.config", "goat_hf.layer"),
    ],
)
def test_lower_floors_do_not_reach_higher_ones(lower, higher):
    graph = import_graph()
    reached, todo = set(), [lower]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert higher not in reached, f"{lower} imports {higher} (directly or through another module)"


def test_the_checker_finds_cycles_it_is_shown(tmp_path):
    """The test above can fail: a cycle through an import inside a function is found."""
    package = tmp_path / "goat_hf"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def later():\n    from . import c\n")
    (package / "c.py").write_text("import goat_hf.a\n")
    graph = import_graph(package)
    assert graph["goat_hf.b"] == {"goat_hf.c"}
    assert find_cycle(graph) == ["goat_hf.a", "goat_hf.b", "goat_hf.c", "goat_hf.a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None
