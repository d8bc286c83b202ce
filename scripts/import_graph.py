"""The import graph of the four top-level packages (cachefs, csi, master, storage_server).

Built with ``ast`` from the source, so it also sees imports inside functions (the lazy ones
that hide cycles from ``python -c 'import x'``). Run it from anywhere:

    .venv/bin/python scripts/import_graph.py            # package edges and module cycles
    .venv/bin/python scripts/import_graph.py --modules  # also every module-level edge

tests/test_layers.py uses the same functions to hold the layering rules.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cachefs", "csi", "master", "storage_server")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" in path.relative_to(ROOT).parts:
                continue  # generated gRPC stubs: they import only their own package's stubs
            yield _module_name(path), path


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.C`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def module_graph() -> dict[str, set[str]]:
    """Every module of the four packages -> the modules of the four packages it imports.

    ``from pkg import mod`` counts as importing ``pkg.mod`` when that is a module; importing
    a package's name alone counts as importing its ``__init__``.
    """
    sources = dict(_sources())
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    if not is_package:
                        base = base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" for alias in node.names]
                targets.append(origin)
            for target in targets:
                if target.split(".")[0] not in PACKAGES:
                    continue
                found = _resolve(target, modules)
                if found is not None and found != module:
                    edges.add(found)
        # "from pkg import mod" adds both pkg and pkg.mod; keep pkg only if a name of it is used
        graph[module] = edges
    return graph


def package_of(module: str) -> str:
    return module.split(".")[0]


def package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(from package, to package) -> the module edges behind it, for different packages."""
    edges: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for module, targets in graph.items():
        for target in targets:
            key = (package_of(module), package_of(target))
            if key[0] != key[1]:
                edges.setdefault(key, []).append((module, target))
    return {key: sorted(value) for key, value in sorted(edges.items())}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="print every module edge too")
    args = parser.parse_args(argv)
    graph = module_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} module edges")
    print("package edges (from -> to: module edges):")
    for (source, target), behind in package_edges(graph).items():
        print(f"  {source} -> {target}: {len(behind)}")
        for module, imported in behind:
            print(f"      {module} -> {imported}")
    if args.modules:
        print("module edges:")
        for module in sorted(graph):
            for target in sorted(graph[module]):
                print(f"  {module} -> {target}")
    found = cycles(graph)
    print(f"module cycles: {len(found)}")
    for component in found:
        print(f"  {len(component)} modules: {' '.join(component)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
