"""The package's shape, read from the source with ``ast``: no import cycle (imports inside functions count: a
cycle hidden in a function is still a cycle), the layers point one way, and no function is longer than 160 lines.

Layers (DESIGN.md): low utilities (images, devices, atomic, errors, progress) <- models <- run / train <- measure
<- commands. Imports under ``if TYPE_CHECKING:`` count too (a type named from above is a dependency on it); a
module's own package (``__init__``) is not counted as imported by it (Python runs it first, but nothing of the
module reaches it).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "slimsd"
# the low utilities; files (names, sha256) and version joined them so that images and models reach nothing above
LOW = {
    *("slimsd.images", "slimsd.devices", "slimsd.atomic", "slimsd.errors", "slimsd.progress"),
    *("slimsd.files", "slimsd.version"),
}
MAX_FUNCTION_LINES = 160


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom in TREE, at any depth, those under ``if TYPE_CHECKING:`` included: a type
    named from a module above is still a dependency on it (the project's before-stop check counts them too)."""
    return (node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The slimsd modules that module NAME imports (relative imports resolved; ``from a import b`` is module
    a.b when that is a module, else a)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        for target in targets:
            while target and target not in modules:  # `import slimsd.x.y` where y is a name
                target = target.rpartition(".")[0]
            if target.startswith("slimsd") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_the_walker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The walker on a made-up package: a function-level import and a relative one make a cycle; a
    TYPE_CHECKING import counts as the dependency it is."""
    pkg = tmp_path / "slimsd"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from slimsd.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slimsd import a\n"
    )
    modules = {module_name_in(p, tmp_path): p for p in pkg.rglob("*.py")}
    graph = {n: imports_of(n, p, modules) for n, p in modules.items()}
    assert graph["slimsd.a"] == {"slimsd.sub.b"} and graph["slimsd.sub.b"] == {"slimsd.a"}
    assert graph["slimsd.sub.c"] == {"slimsd.a"}
    assert cycles(graph) == [["slimsd.a", "slimsd.sub.b"]]


def module_name_in(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _layer(name: str) -> str:
    if name in LOW:
        return "low"
    if name == "slimsd.toy.teacher":  # the toy-sd model's weights: an offline model as micro-sd is (models/)
        return "models"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "slimsd"


# What each layer may not import (the layers above it).
FORBIDDEN = {
    "low": {"models", "train", "run", "measure", "toy", "commands", "cli", "slimsd"},
    "models": {"train", "run", "measure", "toy", "commands", "cli"},
    "run": {"train", "measure", "toy", "commands", "cli"},
}


def test_layers_point_one_way():
    wrong = [
        f"{name} imports {target}"
        for name, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if _layer(target) in FORBIDDEN.get(_layer(name), set())
    ]
    assert wrong == []


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []
