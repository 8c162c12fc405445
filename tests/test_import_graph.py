"""No import circle among the ``robustdet`` modules (docs/architecture.md: each layer imports only from below).

Every import counts: at module level, under ``TYPE_CHECKING`` and inside functions (a deferred import is a
circle all the same; it only hides it from the interpreter). The graph is read from the sources with ``ast``,
nothing is imported. An edge goes to the module an import names: ``from robustdet.data.coco import X`` is an
edge to ``robustdet.data.coco`` (not to the package ``robustdet.data``, whose ``__init__`` Python also runs
first, since that is the package's own business), ``from robustdet.data import build_dataset`` an edge to
``robustdet.data`` (its ``__init__``), ``from robustdet import distributed`` one to ``robustdet.distributed``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "robustdet"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``robustdet.data.coco.X`` -> the module)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds ``module``
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # each imported name may be a submodule (``from robustdet import distributed``)
            names = [f"{base}.{alias.name}" for alias in node.names] if base else []
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: each holds an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One circle through the component's first module, as a path a -> b -> ... -> a (for the message)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest circle back to ``start``
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def test_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself: module level, TYPE_CHECKING, function level, relative and ``from pkg import mod``."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from robustdet.sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from robustdet import a\n"
        "def f():\n    import robustdet.sub.c\n"
    )
    (pkg / "sub" / "c.py").write_text("def g():\n    from ..a import x\n")
    modules = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert graph == {
        "robustdet": set(),
        "robustdet.a": {"robustdet.sub.b"},
        "robustdet.sub": {"robustdet.sub.b"},
        "robustdet.sub.b": {"robustdet.a", "robustdet.sub.c"},
        "robustdet.sub.c": {"robustdet.a"},
    }
    assert strongly_connected(graph) == [["robustdet.a", "robustdet.sub.b", "robustdet.sub.c"]]
    assert a_cycle(graph, ["robustdet.a", "robustdet.sub.b", "robustdet.sub.c"]) == [
        "robustdet.a", "robustdet.sub.b", "robustdet.a"
    ]


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50  # the reader found the package
    circles = [" -> ".join(a_cycle(graph, c)) + f"  (component: {', '.join(c)})" for c in strongly_connected(graph)]
    assert not circles, "import circles:\n" + "\n".join(circles)
