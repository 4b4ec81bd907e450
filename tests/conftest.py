"""Shared fixtures: tiny random checkpoints of each family, built with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.random_checkpoint import make_checkpoint

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny HF folder per family variant, keyed by kind."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {k: make_checkpoint(root / k, k) for k in ("llama", "llama-untied", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def tiny_registry(tiny_checkpoints, tmp_path_factory):
    """A Registry in a tmp dir whose active version is the tiny llama, named `tiny`.

    Fused flavour, fp32; `tiny_registry.active().path` is the version folder. Shared by the
    session: do not modify it.
    """
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("tiny-registry"))
    request = ExportRequest(tiny_checkpoints["llama"], "tiny", flavour="fused", progress=False)
    info, _ = export_checkpoint(request, registry)
    registry.use(info.ref)
    return registry


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny HF folder per family of models.random_checkpoint.FAMILY_KINDS, quirks on."""
    from models.random_checkpoint import FAMILY_KINDS

    root = tmp_path_factory.mktemp("family-checkpoints")
    return {k: make_checkpoint(root / k, k) for k in FAMILY_KINDS}
