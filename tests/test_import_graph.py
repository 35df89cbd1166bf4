"""Imports run one way: every module of the package imports, and no two modules import each
other, directly or around a circle, counting function-local imports as well as top-level ones.

The graph is built from the source (the AST of every file), so an import hidden inside a
function, which Python only runs when the function is called, is an edge like any other. The
one circle allowed is a type-only one: an import under ``if TYPE_CHECKING:`` never runs, and the
Hydra launcher plugin uses one (its core module names the launcher class in annotations while
the launcher imports the core when it launches, as Hydra's own plugins do).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wan_exp", "hydra_plugins")


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported dotted name, type-only) for every import statement anywhere in the file."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, type_only))
            found.extend((f"{target}.{alias.name}", type_only) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported module of the packages: type-only}. Importing ``a.b.c`` also runs
    the ``__init__`` of ``a`` and ``a.b``, except those the importer lies inside (its own
    packages are initialised before it)."""
    files = _module_files()
    graph: dict[str, dict[str, bool]] = {name: {} for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for target, type_only in _imports(tree, name, path.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in files and prefix not in own_packages and prefix != name:
                    # an edge that also runs for real wins over a type-only one
                    graph[name][prefix] = graph[name].get(prefix, True) and type_only
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_circle_and_only_a_circle() -> None:
    """The finder itself, on graphs whose answer is known by eye."""
    assert cycles({"a": {"b": False}, "b": {"c": False}, "c": {"a": False}, "d": {"a": False}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": False}, "b": {"c": False}, "c": {}}) == []
    tree = ast.parse("def f():\n    from wan_exp.x import y\nif TYPE_CHECKING:\n    import wan_exp.z\n")
    assert _imports(tree, "wan_exp.m", False) == [("wan_exp.x", False), ("wan_exp.x.y", False), ("wan_exp.z", True)]
    tree = ast.parse("from . import sibling\nfrom .sub import thing\n")
    assert _imports(tree, "wan_exp.parallel.cfg", False) == [
        ("wan_exp.parallel", False),
        ("wan_exp.parallel.sibling", False),
        ("wan_exp.parallel.sub", False),
        ("wan_exp.parallel.sub.thing", False),
    ]


def test_no_import_cycle_except_a_type_only_one() -> None:
    graph = import_graph()
    assert "wan_exp.config" in graph and graph["wan_exp.config"] == {}, (
        f"wan_exp.config is the schema and imports nothing of the package; it imports {sorted(graph['wan_exp.config'])}"
    )
    real = {name: {t: o for t, o in targets.items() if not o} for name, targets in graph.items()}
    assert cycles(real) == [], "modules that import each other (around a circle)"
    type_only_edges = sorted((a, b) for a, targets in graph.items() for b, o in targets.items() if o)
    assert all(a.startswith("hydra_plugins.") for a, _ in type_only_edges), type_only_edges


# __main__ modules run their program when imported; they are in the graph above all the same
@pytest.mark.parametrize("module", sorted(m for m in _module_files() if not m.endswith(".__main__")))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)
