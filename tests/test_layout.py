"""The source tree's shape: no module over 500 lines, and no import cycle among the project's modules.

Both are read from the files (``ast``), nothing is imported, so the checks are cheap and see every
module, the ones that need a GPU or Ray included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The project's packages: every module under them is checked.
PACKAGES = ("moe_core", "deployments", "merge_jobs", "moe_demo", "benchmarks")
MAX_LINES = 500


def _sources(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Iterator[Path]:
    for package in packages:
        yield from sorted((root / package).rglob("*.py"))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


# ----------------------------------------------------------------------------- size
def test_no_module_is_over_500_lines() -> None:
    over = {p.relative_to(ROOT).as_posix(): n for p in _sources() if (n := _lines(p)) > MAX_LINES}
    assert not over, (
        f"modules over {MAX_LINES} lines: {over}; split each into modules of one concern "
        "(a package, or sibling modules)"
    )


# ----------------------------------------------------------------------------- import cycles
def _module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every project module by dotted name (a package by its own name, for its ``__init__.py``)."""
    out = {}
    for path in _sources(root, packages):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports that never run."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: its top level, and the blocks of top-level
    ``if``/``try``/``with`` statements; not function or class bodies (run later, if at all), and not
    ``if TYPE_CHECKING:`` blocks (never run)."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            pending += node.orelse if _is_type_checking(node) else node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                pending += handler.body
        elif isinstance(node, ast.With):
            pending += node.body


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (``a.b.C`` -> ``a.b``), None outside the project."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Each project module and the project modules it imports when it is imported."""
    modules = _module_names(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {_project_module(a.name, modules) for a in node.names}
                continue
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:  # ``from a import b``: the module a.b when there is one, else a
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else _project_module(base, modules))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle_among_the_project_modules() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_import_graph_sees_the_project() -> None:
    """The walk finds the modules and the imports it should (it cannot pass by seeing nothing)."""
    graph = import_graph()
    assert len(graph) > 80
    assert "deployments.gateway.api" in graph["deployments.gateway.service"]
    assert "moe_core.config" in graph["deployments.app"]  # ``from moe_core.config import ...``
    assert "moe_core.storage.store" in graph["deployments.models.engines"]
    # function-level and TYPE_CHECKING imports do not count
    assert "moe_core.modeling" not in graph["deployments.models.merged"]
    assert "moe_core.engine.core" not in graph["moe_core.engine.scheduler"]
    assert "moe_core.engine.core" not in graph["moe_core.engine.reference"]
    assert (
        "moe_core.engine.reference" in graph["moe_core.engine.core"]
    )  # ``from moe_core.engine import reference``


def test_a_cycle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "c.py").write_text("def g():\n    from pkg import a\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None  # type-checking and lazy imports only
    (pkg / "b.py").write_text("try:\n    from . import c\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), set()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_model_deployments_import_nothing_of_the_http_edge() -> None:
    """The layout's roles hold: a model replica's modules reach neither the gateway, the OpenAI wire
    format nor /infer's HTTP schemas (what the edge and the models share is at the top of deployments/)."""
    graph = import_graph()
    edge = ("deployments.gateway", "deployments.openai_api", "deployments.schemas")
    models = [m for m in graph if m.startswith(("deployments.models", "deployments.promotion"))]
    assert len(models) >= 8
    crossing = {m: sorted(r for r in _reached(graph, m) if r.startswith(edge)) for m in models}
    assert not {m: r for m, r in crossing.items() if r}
