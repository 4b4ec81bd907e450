"""Exports from a GGUF file and of the real default model (SmolLM2-135M-Instruct), both flavours."""

from __future__ import annotations

import pytest

from export.manifest import sha256_file
from export.pipeline import ExportRequest, export_checkpoint
from export.registry import Registry


def test_gguf_source(tiny_checkpoints, tmp_path):
    from tests.models_io.gguf_files import write_tiny_llama

    gguf = write_tiny_llama(tiny_checkpoints["llama"], tmp_path / "tiny.gguf")
    req = ExportRequest(gguf, "from-gguf", flavour="reference", progress=False)
    info, manifest = export_checkpoint(req, Registry(tmp_path / "registry"))
    assert manifest.source.kind == "gguf" and manifest.source.path == str(gguf.resolve())
    assert [(f.name, f.sha256) for f in manifest.source.files] == [("tiny.gguf", sha256_file(gguf))]
    assert manifest.parity.passed and manifest.parity.max_rel_error < 1e-4
    assert manifest.tokenizer.chat_template and "<|im_end|>" in manifest.tokenizer.stop_tokens
    assert (info.path / "tokenizer.json").is_file()


@pytest.mark.slow
def test_default_model_exports_in_both_flavours(tmp_path):
    from models.fetch import default_cache_dir, fetch_default

    cache = default_cache_dir()
    model_dir = fetch_default(cache / "SmolLM2-135M-Instruct", cache_dir=cache, progress=False)
    registry = Registry(tmp_path / "registry")
    for flavour in ["reference", "fused"]:
        req = ExportRequest(model_dir, "smollm2", flavour=flavour, progress=False)
        _, manifest = export_checkpoint(req, registry)
        assert manifest.parity.passed, manifest.parity
        assert manifest.parity.top1_agreement == 1.0
        assert manifest.architecture.num_layers == 30 and manifest.architecture.num_kv_heads == 3
        assert manifest.max_context == 2048
        assert manifest.tokenizer.stop_tokens == ["<|im_end|>"]
