"""No import circle inside the afire package.

The graph is read from the sources (ast), so an import inside a function counts as much as
one at the top of a module: a deferred import hides a circle at import time, it does not
remove it. ``from pkg import name`` is an edge to the module ``pkg.name`` when that is a
module (a .py file, or a compiled extension such as ``afire._C``), else to ``pkg`` itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "afire"


def _modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under ``pkg``."""
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = p.relative_to(pkg.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _defined_names(init: Path) -> set[str]:
    """Names a package's __init__.py binds itself (defs, classes, assignments, and names
    imported from other modules); a name bound only by ``from . import X`` is a module."""
    names = set()
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {a.asname or a.name for a in node.names}
    return names


def import_graph(pkg: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its source)."""
    mods = _modules(pkg)
    top = pkg.name
    inits = {m: p for m, p in mods.items() if p.name == "__init__.py"}

    def target(module: str, name: str | None) -> str | None:
        if name is not None:
            full = f"{module}.{name}"
            if full in mods:
                return full
            if module in inits and name not in _defined_names(inits[module]):
                return full  # a compiled submodule (afire._C): a leaf
        while module and module not in mods:
            module = module.rpartition(".")[0]
        return module or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {target(a.name, None) for a in node.names
                          if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg_name = base
                    for _ in range(node.level - 1):
                        pkg_name = pkg_name.rpartition(".")[0]
                    module = pkg_name + (f".{node.module}" if node.module else "")
                else:
                    module = node.module or ""
                if module.split(".")[0] == top:
                    edges |= {target(module, a.name) for a in node.names}
        graph[mod] = {e for e in edges if e and e != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(c)) for c in comps]


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (for the message)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_afire_has_no_import_circle():
    graph = import_graph()
    assert {"afire.pretrain", "afire.report", "afire.model"} <= set(graph)
    assert "afire.model" in graph["afire.report"]       # the graph sees real edges
    assert cycles(graph) == [], "import circle(s): " + "; ".join(
        " -> ".join(c) for c in cycles(graph))


def test_the_check_finds_a_deferred_circle(tmp_path):
    pkg = tmp_path / "afire"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import _C\nfrom .a import f\n")
    (pkg / "a.py").write_text("from . import _C\nfrom .sub import b\n\ndef f():\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import f\n    return f\n")
    graph = import_graph(pkg)
    assert graph["afire.a"] == {"afire._C", "afire.sub.b"}
    assert graph["afire"] == {"afire._C", "afire.a"}
    assert cycles(graph) == [["afire.a", "afire.sub.b", "afire.a"]]
    (pkg / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []
