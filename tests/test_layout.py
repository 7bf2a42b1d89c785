"""The package's shape: small modules, and imports that only point down.

Every module of ``botkit_tasks`` stays under :data:`MAX_LINES` lines, and the
graph of imports between its modules has no cycle.  Every import counts:
module-level, function-local and ``if TYPE_CHECKING:`` ones, because a cycle
hidden behind a lazy import is still two modules that must be understood
together.  ``from . import x`` is an edge to the submodule ``x`` when there is
one, else to the package ``__init__`` (so a submodule that takes names from its
own package's ``__init__`` while that ``__init__`` re-exports it is a cycle).
The implicit import of parent packages is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "botkit_tasks"
MAX_LINES = 450


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Map each dotted module name under ``root`` to (path, is_package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _nearest(name: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The module ``name`` or its closest enclosing package that exists here."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """The internal import edges of the package at ``root``, every import counted."""
    modules = _modules(root)
    top = root.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # ``from pkg import sub`` imports the submodule when there is one.
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                    for alias in node.names
                ]
            for target in targets:
                if target.split(".")[0] != top:
                    continue
                resolved = _nearest(target, modules)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                child = pending.pop()
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, sorted(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_module_is_over_the_line_limit() -> None:
    # Given every module of the package
    sizes = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text(encoding="utf-8").splitlines())
        for path, _ in _modules(PACKAGE).values()
    }
    # Then none exceeds the house limit
    too_big = {path: lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines: {too_big}"
    assert len(sizes) > 20  # the walk found the package


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph(PACKAGE)
    cycles = find_cycles(graph)
    described = [
        " ; ".join(f"{m} -> {sorted(t for t in graph[m] if t in c)}" for m in c) for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


# The layers of docs/architecture.md, bottom up: a module may import its own
# layer and the ones below, never one above.  Keys are the first component
# under ``botkit_tasks`` ("" is the package root).
LAYERS: dict[str, int] = {
    "errors": 0,
    "_version": 0,
    "_sql": 1,
    "kv": 2,
    "brokers": 2,
    "results": 3,
    "monitor": 3,
    "config": 3,
    "runners": 3,
    "federation": 4,
    "bot": 5,
    "metrics": 6,
    "web": 6,
    "demo": 6,
    "dashboard": 6,
    "cli": 7,
    "": 8,
}


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_down_the_layers() -> None:
    graph = import_graph(PACKAGE)
    unknown = sorted({_layer_of(m) for m in graph} - LAYERS.keys())
    assert not unknown, f"modules with no layer in LAYERS (add them): {unknown}"
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if LAYERS[_layer_of(target)] > LAYERS[_layer_of(module)]
    )
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pkg


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        # A TYPE_CHECKING import still closes a cycle.
        (
            {
                "__init__.py": "",
                "a.py": (
                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
                ),
                "b.py": "from .a import A\n",
            },
            ["pkg.a", "pkg.b"],
        ),
        # So does a function-local import, through a chain of three.
        (
            {
                "__init__.py": "",
                "a.py": "import pkg.b\n",
                "b.py": "def f():\n    from pkg import c\n",
                "c.py": "from . import a\n",
            },
            ["pkg.a", "pkg.b", "pkg.c"],
        ),
        # A submodule taking a name from its package's __init__, which imports it.
        (
            {
                "__init__.py": "",
                "sub/__init__.py": "from .x import X\nVERSION = 1\n",
                "sub/x.py": "from . import VERSION\n",
            },
            ["pkg.sub", "pkg.sub.x"],
        ),
    ],
)
def test_the_cycle_check_finds_cycles(
    tmp_path: Path, files: dict[str, str], cycle: list[str]
) -> None:
    # Given a small package with a known cycle
    pkg = _write(tmp_path, files)
    # Then the check reports exactly it
    assert find_cycles(import_graph(pkg)) == [cycle]


def test_the_cycle_check_accepts_imports_that_point_down(tmp_path: Path) -> None:
    # Given a package whose __init__ re-exports submodules that import a lower one
    pkg = _write(
        tmp_path,
        {
            "__init__.py": "from .top import T\nfrom .low import L\n",
            "top.py": "from .low import L\nfrom pkg import low\n",
            "low.py": "import os\n",
        },
    )
    graph = import_graph(pkg)
    # Then the edges are found and there is no cycle
    assert graph["pkg"] == {"pkg.top", "pkg.low"}
    assert graph["pkg.top"] == {"pkg.low"}
    assert find_cycles(graph) == []
