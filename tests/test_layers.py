"""The import rules: bot -> export -> models one way, no cycles, no tests or private names in the
product, and a bot that never loads torch."""

from __future__ import annotations

import ast
import json
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


# ---- the runtime side and the build side (issue 20) --------------------------------------------
# The runtime install (`pip install -e .`: no torch, no transformers) serves with bot/ and builds
# the default model (`make model`: GGUF -> numpy -> ONNX) with RUNTIME; BUILD needs torch and is
# imported only by the build commands (`python -m models ...`, `python -m export CHECKPOINT`).
RUNTIME = (
    "export",
    "export.__main__",
    "export.gate",
    "export.gguf_source",
    "export.graph_fused",
    "export.graph_reference",
    "export.manifest",
    "export.onnx_graph",
    "export.pipeline",
    "export.quantize",
    "export.registry",
    "export.runner",
    "export.verify",
    "export.weights",
    "models",
    "models.chat_encoding",
    "models.chat_template",
    "models.config",
    "models.errors",
    "models.fetch",
    "models.gguf",
    "models.lazy_tensors",
    "models.rope",
    "models.tokenizer",
)
BUILD = (
    "models.__main__",
    "models.checkpoint",
    "models.data",
    "models.evaluate",
    "models.lora",
    "models.model",
    "models.random_checkpoint",
    "models.train",
)
HEAVY = ("torch", "transformers")  # what the runtime install does not have
SERVING = sorted(n for n in MODULES if top(n) == "bot" or n == "migrations") + sorted(RUNTIME)

# A meta-path finder that makes `import torch` and `import transformers` fail, as in the runtime
# install; prefixed to the code a subprocess runs.
BLOCK_HEAVY = f"""
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def module_level_imports(path: Path) -> Iterator[tuple[str, int]]:
    """(module, line) of the imports a module runs when imported: top level, inside top-level
    try/if blocks, not inside functions, classes or `if TYPE_CHECKING:`."""
    pending = list(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield from ((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            pending += [s for handler in node.handlers for s in handler.body]


def test_every_module_of_export_and_models_is_on_one_side():
    sides = set(RUNTIME) | set(BUILD)
    assert not set(RUNTIME) & set(BUILD)
    assert {n for n in MODULES if top(n) in ("export", "models")} == sides, (
        "add each new module of export/ or models/ to RUNTIME or BUILD in tests/test_layers.py"
    )


def test_the_serving_side_imports_no_torch_and_no_build_module_when_loaded():
    found = []
    for name in SERVING:
        for module, line in module_level_imports(MODULES[name]):
            parent, _, last = module.rpartition(".")
            loaded = target(parent, last) if parent else target(module, None)
            if module.partition(".")[0] in HEAVY or loaded in BUILD:
                found.append(f"{MODULES[name].relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "\n".join(found)


def test_module_level_imports_skip_functions_and_type_checking(tmp_path: Path):
    file = tmp_path / "mod.py"
    file.write_text(
        "import a\nfrom b import c\nif TYPE_CHECKING:\n    import d\nelse:\n    import e\n"
        "try:\n    import f\nexcept ImportError:\n    import g\n"
        "def h():\n    import i\nclass J:\n    import k\n"
    )
    assert [m for m, _ in module_level_imports(file)] == ["a", "b.c", "f", "g"]


def test_the_serving_side_runs_without_torch(tiny_checkpoints, tmp_path: Path):
    """With torch and transformers unimportable, every serving module imports, and `make
    model`'s ensure-default (no checkpoint: the default model's GGUF) builds, verifies and
    publishes a tiny GGUF, written here from a tiny random checkpoint."""
    from tests.models_io.gguf_files import write_tiny_llama

    gguf = write_tiny_llama(tiny_checkpoints["llama"], tmp_path / "default.gguf")
    registry = tmp_path / "registry"
    code = f"""
import importlib, json
for name in {SERVING!r}:
    importlib.import_module(name)
try:
    import torch
    blocked = False
except ImportError:
    blocked = True
import models.fetch
from pathlib import Path
models.fetch.fetch_gguf = lambda cache_dir=None, progress=True: Path(sys.argv[1])
from export.__main__ import main
argv = ["ensure-default", "--name", "smollm2", "--registry", sys.argv[2], "--quiet"]
code = main([*argv, "--precision", "fp32"])
from export.registry import Registry
manifest = Registry(Path(sys.argv[2])).active().manifest()
loaded = sorted(set({HEAVY!r}) & set(sys.modules))
print(json.dumps({{"blocked": blocked, "code": code, "loaded": loaded,
                   "manifest": manifest.model_dump(mode="json")}}))
"""
    done = run_without_torch(code, str(gguf), str(registry))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["blocked"] and result["code"] == 0 and result["loaded"] == []
    manifest = result["manifest"]
    assert manifest["name"] == "smollm2" and manifest["precision"] == "fp32"
    assert manifest["source"]["kind"] == "gguf" and manifest["parity"]["passed"]
    assert manifest["parity"]["max_rel_error"] < 1e-5
    # the default model's sampling (the model card's) comes with it
    assert manifest["generation"]["temperature"] == 0.2 and manifest["generation"]["top_p"] == 0.9


def test_build_commands_without_torch_say_what_to_install(tiny_checkpoints, tmp_path: Path):
    registry = tmp_path / "registry"
    code = """
from export.__main__ import main as export_main
from models.__main__ import main as models_main
print(models_main(["fetch-default", sys.argv[2]]))
print(export_main([sys.argv[1], "--name", "tiny", "--registry", sys.argv[3]]))
print(export_main(["ensure-default", sys.argv[1], "--name", "tiny", "--registry", sys.argv[3]]))
"""
    args = (str(tiny_checkpoints["llama"]), str(tmp_path / "hf"), str(registry))
    done = run_without_torch(code, *args)
    assert done.stdout.split() == ["2", "2", "2"], done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3, done.stderr
    for line in lines:
        assert line.startswith("error: ") and "needs PyTorch" in line
        assert line.endswith("install the build extras: pip install -e '.[train]'")
    assert not (tmp_path / "hf").exists() and not any(registry.rglob("*.onnx"))
