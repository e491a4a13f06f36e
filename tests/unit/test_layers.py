"""The package's structure: layers that import only downwards, no import circle, and every module
importable on its own (issue 16; docs/architecture.md, "how the pieces fit").

The import graph is read from the source (``ast``), with imports made inside functions counted
as edges: a lazy import cannot hide a circle here.  Imports under ``if TYPE_CHECKING:`` are not
edges (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import celery_ext

PACKAGE = Path(celery_ext.__file__).parent

#: Lowest first.  A module may import from its own layer and those below, never from above.
#: The first matching entry names a module's layer (a package name covers its modules).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "errors",
            "model",
            "cursor",
            "validation",
            "message",
            "config",
            "registry",
            "forksafe",
            "nowait",
            "transport",
            "observer",
            "tasklog",
            "embedded",
            "schedules.model",
            "events.model",
        ),
    ),
    (
        "parts",
        (
            "storage",
            "events",
            "metrics",
            "executors",
            "routing.heartbeat!",  # not a part: the worker's bootstep (below, "celery side")
            "routing",
            "plugins.host!",
            "plugins",
            "completion",
            "config_store",
            "redis_wire",
            "dispatch",
        ),
    ),
    ("services", ("lifecycle", "runner", "canvas", "manager", "schedules")),
    ("runtime", ("runtime",)),
    (
        "celery side",
        (
            "task",
            "guard",
            "lease",
            "held",
            "recovery",
            "scheduler",
            "reload",
            "routing.heartbeat",
            "plugins.host",
            "worker",
        ),
    ),
    ("composition root", ("factory", "backend")),
    ("clients", ("functions", "config_check", "api", "ui", "cli", "")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def layer_of(module: str) -> int:
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            excluded = name.endswith("!")
            name = name.rstrip("!")
            if module == name or (name and module.startswith(name + ".")) or (not name and not module):
                if excluded:
                    break  # listed further up
                return index
    raise AssertionError(f"celery_ext.{module} is in no layer of LAYERS")


def imported(node: ast.Import | ast.ImportFrom, name: str, path: Path, modules: set[str]) -> set[str]:
    """The celery_ext modules one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        full = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(["celery_ext", *package[: len(package) - node.level + 1], base]).strip(".")
        full = [f"{base}.{alias.name}" for alias in node.names]
        # ``from celery_ext.x import name``: the module x, unless name is a module itself
        full = [f if f.removeprefix("celery_ext").lstrip(".") in modules else base for f in full]
    return {f.removeprefix("celery_ext").lstrip(".") for f in full if f == "celery_ext" or f.startswith("celery_ext.")}


def imports() -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported celery_ext module, line)}, TYPE_CHECKING blocks left out."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[tuple[str, int]]] = {}
    for name, path in modules.items():
        edges: set[tuple[str, int]] = set()
        pending: list[ast.AST] = [ast.parse(path.read_text())]
        while pending:
            for child in ast.iter_child_nodes(pending.pop()):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    edges |= {(target, child.lineno) for target in imported(child, name, path, set(modules))}
                pending.append(child)
        graph[name] = {(target, line) for target, line in edges if target != name}
    return graph


def circles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_no_import_circle_even_through_imports_inside_functions() -> None:
    assert circles(imports()) == []


def test_no_module_imports_from_a_layer_above_it() -> None:
    upward = [
        f"celery_ext.{module} ({LAYERS[layer_of(module)][0]}) imports celery_ext.{target} "
        f"({LAYERS[layer_of(target)][0]}) at line {line}"
        for module, edges in sorted(imports().items())
        for target, line in sorted(edges)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_layer_check_sees_a_violation() -> None:
    """The checks above could fail: an upward edge and a circle are found when present."""
    graph = {"model": {("factory", 1)}, "factory": {("model", 2)}}
    assert layer_of("factory") > layer_of("model")
    assert circles(graph) == [["factory", "model"]]


@pytest.mark.parametrize(
    "module",
    sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"),  # a program runs
)
def test_every_module_imports_on_its_own(module: str) -> None:
    """``python -c "import celery_ext.X"`` in a fresh interpreter, for every X (an import order
    that only works after another module was imported is a hidden circle)."""
    name = f"celery_ext.{module}".rstrip(".")
    done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
