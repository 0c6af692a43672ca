"""The code's shape: every import points down the flow, none makes a cycle, no module is too long.

    runners  ->  methods (plugins -> methods.shared)  ->  cl_bench

and inside ``cl_bench``, by the stage of the flow each part serves:

    run (stream_run, run_config, memory_plan)  ->  recording  ->  on_policy  ->  evaluation  ->  generation
        ->  training  ->  models  ->  data  ->  foundation (errors, files, rng, distributed, progress, config, ...)

An import may name its own layer or any below it, never one above, type hints under
``if TYPE_CHECKING:`` included (a hint upward is a circle a reader has to follow too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("cl_bench", "methods", "runners")
#: module name prefix -> layer (the longest matching prefix decides); higher layers import lower ones
LAYERS = {
    "cl_bench": 0,  # foundation: the package's top-level utility modules
    "cl_bench.data": 1,
    "cl_bench.models": 2,
    "cl_bench.training": 3,
    "cl_bench.generation": 3.5,  # the engines: HF generate and vLLM, for evaluation and rollouts
    "cl_bench.evaluation": 4,
    "cl_bench.on_policy": 5,  # learning from the policy's completions: generation and scorers below it
    "cl_bench.recording": 6,
    "cl_bench.run_config": 7,
    "cl_bench.memory_plan": 7,
    "cl_bench.stream_run": 7,
    "methods.shared": 8,
    "methods": 9,
    "runners": 10,
}
#: a module longer than this has usually grown a second job: split it by job (measured on code as
#: ruff formats it at 120 columns, where the largest module, stream_run.py, has about 370 lines)
MAX_LINES = 400


def layer(module: str) -> int:
    parts = module.split(".")
    return next(LAYERS[".".join(parts[:i])] for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in LAYERS)


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
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


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


def every_import(tree: ast.AST) -> list[str]:
    """Every module named by any import, type hints under ``if TYPE_CHECKING:`` included."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.extend([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
    return names


def import_graph(find=runtime_imports) -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = find(ast.parse(path.read_text(), str(path)))
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_every_import_points_down_the_flow():
    upward = [
        f"{a} imports {b}" for a, targets in import_graph(every_import).items() for b in targets if layer(b) > layer(a)
    ]
    assert upward == []


def test_the_layer_check_places_modules_by_their_longest_prefix():
    assert [
        layer(m)
        for m in (
            "cl_bench.errors",
            "cl_bench.data.tasks",
            "cl_bench.evaluation.metrics",
            "cl_bench.stream_run",
            "methods.shared.masking",
            "methods.ewc",
            "runners.cl",
        )
    ] == [0, 1, 4, 7, 8, 9, 10]


def test_no_import_cycle():
    graph = import_graph(every_import)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert cycles == []


def test_the_checks_see_imports_and_skip_type_hints():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from methods.base import CLMethod\n"
        "import cl_bench.errors\ndef f():\n    from runners.cl import main\n"
    )
    assert runtime_imports(tree) == [
        "typing",
        "typing.TYPE_CHECKING",
        "cl_bench.errors",
        "runners.cl",
        "runners.cl.main",
    ]


#: what only the framework may name: ranks, shards and process groups (cl_bench/distributed.py,
#: cl_bench/training/sharding.py, torch's own)
PROCESS_HELPERS = ("cl_bench.distributed", "cl_bench.training.sharding", "torch.distributed")
#: the plugins and the paradigms: they reach the processes through the module and its views
#: (cl_bench/training/processes.py, parameter_views.py)
PLUGIN_PACKAGES = ("methods", "cl_bench.on_policy")


def names_a_process_helper(imported: str) -> bool:
    return any(imported == h or imported.startswith(h + ".") for h in PROCESS_HELPERS)


def reaches_torch_distributed(tree: ast.AST) -> bool:
    """``torch.distributed`` named as an attribute (``torch.distributed.all_reduce(...)``)."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
        for node in ast.walk(tree)
    )


def test_no_plugin_or_paradigm_imports_a_rank_shard_or_process_group_helper():
    """A method or a learning paradigm states its algorithm once; where it lives (which process,
    which rows) is the module's business (``module.processes``, ``module.full_weights()``,
    ``ParameterViews``)."""
    found = []
    for name, path in project_modules().items():
        if not any(name == p or name.startswith(p + ".") for p in PLUGIN_PACKAGES):
            continue
        tree = ast.parse(path.read_text(), str(path))
        found += [f"{name} imports {m}" for m in every_import(tree) if names_a_process_helper(m)]
        found += [f"{name} calls torch.distributed"] if reaches_torch_distributed(tree) else []
    assert found == []


def test_the_process_helper_check_sees_every_way_of_naming_one():
    tree = ast.parse(
        "import torch.distributed as dist\nfrom cl_bench.distributed import rank\n"
        "def f():\n    from cl_bench.training.sharding import full_weights\nimport torch.nn\n"
        "from cl_bench.distributed_notes import x\n"
    )
    assert [m for m in every_import(tree) if names_a_process_helper(m)] == [
        "torch.distributed",
        "cl_bench.distributed",
        "cl_bench.distributed.rank",
        "cl_bench.training.sharding",
        "cl_bench.training.sharding.full_weights",
    ]
    assert reaches_torch_distributed(ast.parse("import torch\ntorch.distributed.all_reduce(t)\n"))
    assert not reaches_torch_distributed(ast.parse("import torch\ntorch.nn.functional.relu(t)\n"))


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_no_module_is_longer_than_a_reader_holds(name):
    lines = project_modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines"
