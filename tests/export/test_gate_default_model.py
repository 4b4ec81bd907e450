"""The version `make run` publishes for the real default model passes the quality gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.__main__ import main
from export.manifest import Manifest
from export.registry import Registry
from tests.models_io.conftest import cache_dir, default_gguf, default_model_dir  # noqa: F401

pytestmark = pytest.mark.slow


def test_ensure_default_publishes_a_version_that_passes_the_gate(
    capsys,
    default_model_dir: Path,  # noqa: F811
    tmp_path: Path,
):
    registry = tmp_path / "registry"
    args = ["ensure-default", str(default_model_dir), "--name", "smollm2", "--quiet"]
    assert main([*args, "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.read(Registry(registry).active().path)
    gate = manifest.gate
    assert gate is not None and gate.passed, out
    assert gate.prompts >= 24 and gate.answers_equal >= gate.min_equal
    assert gate.example_correct and "Paris" in gate.example_answer
    # whatever was refused on the way says why
    for line in out.splitlines():
        if line.startswith("not serving"):
            assert "quality gate FAILED" in line or "parity" in line
    if manifest.precision == "fp32":
        assert "publishing fp32: no quantized version passed the quality gate" in out
