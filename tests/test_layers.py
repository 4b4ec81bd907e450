"""The import rules: bot -> export -> models one way, no cycles, no tests or private names in the
product, and a bot that never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "export", "models", "migrations")  # the product
SCANNED = (*PACKAGES, "scripts")
# a layer -> the layers it must not import (each may import the ones below it)
FORBIDDEN = {"models": {"export", "bot", "migrations"}, "export": {"bot", "migrations"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the scanned folders, by dotted name."""
    found = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path)] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> Iterator[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for each import anywhere in the file (function
    bodies and TYPE_CHECKING blocks included), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name, node.lineno


def target(module: str, name: str | None) -> str | None:
    """The scanned module an import statement loads (`from a import b` loads a.b if b is a
    module), or None for anything outside."""
    for candidate in (f"{module}.{name}" if name else None, module):
        if candidate in MODULES:
            return candidate
    return None


def top(module: str) -> str:
    return module.split(".")[0]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, imported, _ in imports(name, path):
            dep = target(module, imported)
            if dep is not None:
                edges[name].add(dep)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing
    itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
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
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return found


def violations() -> Iterator[str]:
    for name, path in MODULES.items():
        where = path.relative_to(ROOT)
        layer = top(name)
        for module, imported, line in imports(name, path):
            full = f"{module}.{imported}" if imported else module
            if top(module) in FORBIDDEN.get(layer, ()):
                yield f"{where}:{line}: {layer} imports {full} (a layer above it)"
            if top(module) == "tests":
                yield f"{where}:{line}: the product imports {full} from the tests"
            private = [p for p in full.split(".") if p.startswith("_") and not p.startswith("__")]
            if layer == "scripts" and top(module) in PACKAGES and private:
                yield f"{where}:{line}: a script imports the private name {full}"


def test_the_layers_import_one_way_and_nothing_imports_tests_or_private_names():
    assert {"bot.client", "export.registry", "models.model", "migrations.env"} <= set(MODULES)
    found = list(violations())
    assert not found, "\n".join(found)


def test_no_import_cycles_between_modules():
    found = cycles(graph())
    assert not found, "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"a"}}, [["a"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_imports_are_found_in_function_bodies_and_resolved(tmp_path: Path):
    file = tmp_path / "mod.py"
    file.write_text(
        "from . import sibling\nfrom ..up import thing\n"
        "def f():\n    import export.registry\n    from scripts import _hidden\n"
    )
    found = [(m, n) for m, n, _ in imports("bot.engine.mod", file)]
    assert found == [
        ("bot.engine", "sibling"),
        ("bot.up", "thing"),
        ("export.registry", None),
        ("scripts", "_hidden"),
    ]


def test_the_bot_never_loads_torch():
    """Every module of bot/ imported together (the migrations too) leaves torch unloaded."""
    names = sorted(n for n in MODULES if top(n) == "bot" or n == "migrations")
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted({'torch', 'onnx', 'transformers'} & set(sys.modules))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
