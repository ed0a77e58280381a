"""No import circles in the project's packages.

The graph is read from the source with ``ast``, so a lazy import inside a function counts as much
as one at the top: a circle hidden in a function still makes two modules one unit that can only
be understood, tested and changed together. Its edges:

* every ``import`` and ``from ... import`` statement anywhere in a module, except in the body of
  ``if TYPE_CHECKING:`` (annotations only, never run);
* relative imports resolved against the importing module's package;
* ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; so
  a submodule's ``from . import sibling`` is an edge to the sibling, not to its parent package;
* ``import a.b.c`` is an edge to the longest of ``a.b.c``, ``a.b``, ``a`` that is a module here;
  imports of other packages (torch, ray, ...) are not edges.

A circle is a strongly connected component of more than one module; each package's case lists
every circle that has a module in it, with one path around it.
"""
from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vpns_core", "sweeps", "analysis", "search_spaces")


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> its file, for every ``.py`` file under ``root/<package>``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_statements(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` at any depth, except in ``if TYPE_CHECKING:`` bodies
    (their ``else:`` runs, so it counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (the rules in the module docstring)."""
    modules = find_modules(root, packages)

    def known(name: str) -> str | None:  # the longest prefix of ``name`` that is a module here
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in import_statements(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else known(source)
                           for alias in node.names]
            graph[name].update(t for t in targets if t is not None and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative),
    each sorted, in a fixed order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(found)


def path_around(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to it, inside the component."""
    start, inside = component[0], set(component)
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & inside):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{component} is not strongly connected")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package, graph):
    found = [c for c in circles(graph) if any(m == package or m.startswith(package + ".") for m in c)]
    for component in found:
        print(f"circle of {len(component)} modules: {', '.join(component)}\n"
              f"  e.g. {' -> '.join(path_around(graph, component))}")
    assert not found, (f"{package}: {len(found)} import circle(s): " +
                       "; ".join(" -> ".join(path_around(graph, c)) for c in found))


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_graph_follows_its_rules(tmp_path):
    """The rules of the module docstring, on a package made for them."""
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import thing\n",
        "pkg/a.py": "import os\nfrom . import b\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from pkg import a\nelse:\n    import pkg.sub.c\n"),
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "def f():\n    from ..a import thing\n    from pkg.sub import nothing\n",
    })
    assert import_graph(tmp_path, ("pkg",)) == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},  # `from . import b`: the sibling, not the package
        "pkg.b": {"pkg.sub.c"},  # TYPE_CHECKING's body skipped, its else counted
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.sub"},  # lazy and relative; `nothing` is not a module
    }


def test_circles_are_found_with_a_path_around_them():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert circles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert path_around(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
