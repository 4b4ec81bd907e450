"""Fixtures of the export tests: reference graphs of the tiny checkpoints, a published version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.graph_reference import build_reference_graph
from export.onnx_graph import save_model
from export.pipeline import ExportRequest, export_checkpoint
from export.registry import Registry
from export.weights import ExportSource, load_export_source

KINDS = ("llama", "llama-untied", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def sources(tiny_checkpoints) -> dict[str, ExportSource]:
    return {kind: load_export_source(tiny_checkpoints[kind]) for kind in KINDS}


@pytest.fixture(scope="session")
def reference_graphs(sources, tmp_path_factory) -> dict[str, Path]:
    """kind -> model.onnx of the reference flavour (with model.onnx.data beside it)."""
    root = tmp_path_factory.mktemp("reference-graphs")
    graphs = {}
    for kind, src in sources.items():
        (root / kind).mkdir()
        graphs[kind] = save_model(build_reference_graph(src), root / kind / "model.onnx")
    return graphs


@pytest.fixture(scope="session")
def published_version(tiny_checkpoints, tmp_path_factory) -> Path:
    """A reference-flavour version of the tiny llama, published once (read-only for tests)."""
    registry = Registry(tmp_path_factory.mktemp("published"))
    req = ExportRequest(tiny_checkpoints["llama"], "tiny", flavour="reference", progress=False)
    info, _ = export_checkpoint(req, registry)
    return info.path


@pytest.fixture
def version_copy(published_version, tmp_path) -> Path:
    """A private copy of the published version folder, free to damage."""
    return Path(shutil.copytree(published_version, tmp_path / "v1"))


@pytest.fixture
def copy_build(published_version):
    """A Registry.publish build function that fills the folder from the published version."""

    def build(folder: Path) -> None:
        shutil.copytree(published_version, folder, dirs_exist_ok=True)

    return build
