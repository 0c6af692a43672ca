"""The code's shape: layers import one way at run time, no cycles, no module too long to read.

    runners  ->  methods  ->  cl_bench          (and runners -> cl_bench)

``cl_bench`` (the benchmark: data, training, evaluation, recording) never imports ``methods`` or
``runners``; ``methods`` never imports ``runners``. Imports under ``if TYPE_CHECKING:`` are type
hints only and do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("cl_bench", "methods", "runners")
LAYER = {"cl_bench": 0, "methods": 1, "runners": 2}
MAX_LINES = 300


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if all(p.isidentifier() for p in parts):
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[str]:
    """Every module named by an import that runs (at import time or inside a function)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.extend([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = runtime_imports(ast.parse(path.read_text(), str(path)))
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_layers_import_downwards_only():
    upward = [f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
              if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert upward == []


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert cycles == []


def test_the_checks_see_imports_and_skip_type_hints():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from methods.base import CLMethod\n"
                     "import cl_bench.errors\ndef f():\n    from runners.cl import main\n")
    assert runtime_imports(tree) == ["typing", "typing.TYPE_CHECKING", "cl_bench.errors", "runners.cl", "runners.cl.main"]


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_no_module_is_longer_than_a_reader_holds(name):
    lines = project_modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines"
