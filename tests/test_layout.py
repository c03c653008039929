"""The package's shape: no import cycles, no module named like a standard-library module, every
error defined in `ckptmap.errors`.

The import graph is read from the source (every ``import`` statement, at any depth, except
those under ``if TYPE_CHECKING:``), so an import moved into a function to dodge a cycle still
counts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "ckptmap"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from ckptmap.formats import sniff` imports the submodule `sniff`.
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _parents(name: str) -> set[str]:
    # A submodule's own package is imported before it; that edge is not a cycle.
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _cycles() -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node] - _parents(node)):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            dfs(node)
    return found


def test_the_graph_sees_the_package():
    assert "ckptmap.errors" in GRAPH and len(GRAPH) > 20
    assert "ckptmap.errors" in GRAPH["ckptmap.module_load"]


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_finder_finds_cycles(monkeypatch):
    monkeypatch.setitem(GRAPH, "ckptmap.errors", {*GRAPH["ckptmap.errors"], "ckptmap.report"})
    monkeypatch.setitem(GRAPH, "ckptmap.report", {*GRAPH["ckptmap.report"], "ckptmap.errors"})
    assert any({"ckptmap.errors", "ckptmap.report"} <= set(cycle) for cycle in _cycles())


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_named_like_the_standard_library(name):
    assert name.rsplit(".", 1)[-1] not in sys.stdlib_module_names


def _classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(base, (ast.Name, ast.Attribute))
            and (getattr(base, "id", None) or getattr(base, "attr", "")).endswith(
                ("Error", "Warning", "Exception")
            )
            for base in node.bases
        )
    ]


def test_every_error_class_lives_in_errors_module():
    elsewhere = {
        name: classes
        for name, path in MODULES.items()
        if name != "ckptmap.errors" and (classes := _classes(path))
    }
    # Private control-flow exceptions (never raised to callers) are the only exception.
    elsewhere = {n: [c for c in cs if not c.startswith("_")] for n, cs in elsewhere.items()}
    assert {n: cs for n, cs in elsewhere.items() if cs} == {}
