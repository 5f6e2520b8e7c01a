"""Imports inside cnnpar/ point one way: the graph of which module imports which has no cycle.

The graph is read from the source with `ast`, so it sees every import, also those inside functions (which
run later, but still make the two modules depend on each other). An edge goes to the module an import names:
`from . import shm` in a package names its submodule, `from .primitives import LINE` the module primitives.
Importing a submodule runs its package's __init__ first, but that is not an edge: a package's __init__ may
gather its submodules (a factory) without them depending on it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "cnnpar"


def module_names(package_dir: Path) -> dict:
    """Dotted module name -> source file, for every .py file below package_dir."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(node, module: str, is_package: bool) -> list:
    """The dotted names an import statement refers to (modules, or a module's attributes)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: level 1 is this module's own package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[:len(package) - node.level + 1]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module
    return [stem] + [f"{stem}.{alias.name}" for alias in node.names]


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict:
    """module -> set of the package's modules it imports."""
    modules = module_names(package_dir)
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported(node, module, is_package)
            if isinstance(node, ast.ImportFrom):  # `from X import y`: the submodule X.y where there is one
                stem, members = names[0], names[1:]
                found = [name for name in members if name in modules]
                if len(found) < len(members) and stem in modules:
                    found.append(stem)
                targets.update(found)
            else:
                targets.update(name for name in names if name in modules)
        targets.discard(module)
        graph[module] = targets
    return graph


def tangles(graph: dict) -> list:
    """The groups of modules that import each other in a circle (strongly connected, two or more modules)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node):  # Tarjan's algorithm; the package has a few dozen modules, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def cycle_within(graph: dict, group: set) -> list:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start = min(group)
    came_from = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & group):
                if succ == start:
                    path = [node]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if succ not in came_from:
                    came_from[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_the_graph_sees_relative_and_function_level_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .sub import leaf\n")
    (package / "sub" / "__init__.py").write_text("from . import leaf\nfrom .leaf import X\n")
    (package / "sub" / "leaf.py").write_text("X = 1\ndef later():\n    from .. import top\n")
    (package / "top.py").write_text("import pkg.sub\nfrom pkg.sub.leaf import X\n")
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.sub.leaf"}, "pkg.sub": {"pkg.sub.leaf"}, "pkg.sub.leaf": {"pkg.top"},
                     "pkg.top": {"pkg.sub", "pkg.sub.leaf"}}
    assert tangles(graph) == [{"pkg.sub", "pkg.sub.leaf", "pkg.top"}]
    assert cycle_within(graph, tangles(graph)[0]) == ["pkg.sub", "pkg.sub.leaf", "pkg.top", "pkg.sub"]


def test_no_import_cycle_inside_cnnpar():
    graph = import_graph()
    assert "cnnpar.train" in graph and graph["cnnpar.train"], "the graph found no imports: the parser is broken"
    found = [f"{' -> '.join(cycle_within(graph, group))}  (circle among {', '.join(sorted(group))})"
             for group in tangles(graph)]
    assert not found, "import cycles inside cnnpar/:\n" + "\n".join(found)


def test_no_module_or_script_edits_sys_path():
    """The package imports by its name wherever it is installed; the scripts in launch/ and analysis/ are thin
    entry points into it, so nothing needs sys.path edited (tests/ puts only itself there, in conftest.py)."""
    repo = PACKAGE_DIR.parent
    offenders = []
    for folder in ("cnnpar", "launch", "analysis"):
        for path in sorted((repo / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append")
                        and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                        and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                    offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert offenders == []
