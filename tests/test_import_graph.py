"""The code's shape: no import cycle among the project's modules (imports inside functions counted too), no function
over 80 lines, the sparse layer's forward at most 50; one registry mechanism for host families and methods."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: installed package -> source folder (pyproject's package-dir)
PACKAGES = {"pmod_bench": "pmod_bench", "pmod_bench.model": "model", "pmod_bench.tasks": "tasks",
            "pmod_bench.reports": "reports"}
#: every folder of Python code (the length rule covers tests and benchmarks too)
CODE = ("pmod_bench", "model", "tasks", "reports", "benchmarks", "tests")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed packages."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if pkg == "pmod_bench" and parts and f"pmod_bench.{parts[0]}" in PACKAGES:
                continue
            mods[".".join([pkg, *parts])] = path
    return mods


def _imported(node: ast.AST, module: str, is_package: bool, mods: dict) -> list[str]:
    """The project modules one import statement names (``from pkg import mod`` names the module ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        src = (base + ("." + node.module if node.module else "")) if node.level else node.module
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in mods:  # pmod_bench.model.hosts.llava_next.grid_shape -> its module
            name = name.rpartition(".")[0] if name.startswith("pmod_bench") else ""
        if name:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top level and inside functions (every import statement)."""
    mods = project_modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            graph[module].update(t for t in _imported(node, module, path.name == "__init__.py", mods) if t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 100 and "pmod_bench.model.layer" in graph["pmod_bench.model.routed"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles_through_imports_in_functions():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .runner import x\n")
    mods = {"pmod_bench.tasks.plugin": None, "pmod_bench.tasks.runner": None}
    assert _imported(tree.body[0].body[0], "pmod_bench.tasks.plugin", False, mods) == ["pmod_bench.tasks.runner"]


def _functions():
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield path.relative_to(ROOT), node


def test_no_function_is_over_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def test_the_sparse_layer_forward_is_at_most_50_lines():
    from pmod_bench.model.layer import SparseLayerMixin

    import inspect

    lines, _ = inspect.getsourcelines(SparseLayerMixin.forward)
    assert len(lines) <= 50, len(lines)


# ----------------------------------------------------------------------------------- registries
def test_one_registry_for_host_families_and_methods():
    from pmod_bench.methods.base import METHODS
    from pmod_bench.model.hosts import HOSTS, HostAdapter, HostError, host_for
    from pmod_bench.model.registry import Registry

    assert isinstance(HOSTS, Registry) and isinstance(METHODS, Registry)
    assert {"llava", "llava_next", "pmod_llava", "pmod_llava_next"} <= set(HOSTS.known())
    assert {"fastv", "pyramiddrop", "sparsevlm", "random_llm", "visionzip", "illava"} <= set(METHODS.known())
    assert host_for("pmod_llava_next") is host_for("llava_next")
    with pytest.raises(HostError) as err:
        host_for("mllama")
    assert "\n" not in str(err.value) and "llava_next (LLaVA-NeXT)" in str(err.value) and "Add a host family" in str(err.value)

    class Other(HostAdapter):
        model_type = "llava"

    with pytest.raises(TypeError, match="registered twice"):
        HOSTS.register("llava")(Other)
    with pytest.raises(TypeError, match="subclass of HostAdapter"):
        HOSTS.register("something")(object)
