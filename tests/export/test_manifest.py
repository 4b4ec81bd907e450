"""The manifest of a published version, and load() catching missing or changed files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.manifest import MANIFEST_NAME, Manifest, ManifestError, sha256_file
from export.pipeline import GENERATION_KEYS, ExportRequest, export_checkpoint
from export.registry import Registry


def test_manifest_describes_the_version(published_version, tiny_checkpoints):
    m = Manifest.load(published_version, verify_hashes=True)
    source = tiny_checkpoints["llama"]
    assert (m.name, m.version, m.flavour, m.precision) == ("tiny", 1, "reference", "fp32")
    assert m.source.path == str(source.resolve())
    assert [(f.name, f.sha256) for f in m.source.files] == [
        ("model.safetensors", sha256_file(source / "model.safetensors"))
    ]
    assert m.architecture.num_kv_heads == 2 and m.architecture.tie_word_embeddings
    names = {f.name for f in m.files}
    assert {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    assert MANIFEST_NAME not in names
    for f in m.files:
        assert (published_version / f.name).stat().st_size == f.size
    assert (
        m.graph.kv_layout == "concat" and m.graph.logits == "all" and m.graph.kv_dtype == "float32"
    )
    assert [t.name for t in m.graph.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert m.opset >= 17 and m.onnxruntime_version
    assert m.parity is not None and m.parity.passed and not m.forced
    assert m.max_context == 256  # the tiny model's max_position_embeddings caps the default


def test_tokens_template_and_generation_defaults(published_version, tiny_checkpoints):
    m = Manifest.read(published_version)
    t = m.tokenizer
    assert "<|im_end|>" in t.chat_template and t.chat_template_file == "chat_template.jinja"
    assert (published_version / "chat_template.jinja").read_text() == t.chat_template
    assert t.eos_token == "<|im_end|>" and "<|im_end|>" in t.stop_tokens
    assert t.special_tokens["<|im_end|>"] in t.stop_token_ids
    # config.json's eos_token_id (2 in the tiny checkpoints) is a stop token too
    assert 2 in t.stop_token_ids
    generation = json.loads((tiny_checkpoints["llama"] / "generation_config.json").read_text())
    assert m.generation == {k: v for k, v in generation.items() if k in GENERATION_KEYS}


def test_sampling_defaults_come_from_generation_config(tiny_checkpoints, tmp_path):
    checkpoint = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "ckpt"))
    config_file = checkpoint / "generation_config.json"
    generation = json.loads(config_file.read_text())
    wanted = {"do_sample": True, "temperature": 0.6, "top_p": 0.85, "repetition_penalty": 1.2}
    config_file.write_text(json.dumps(generation | wanted))
    req = ExportRequest(checkpoint, "gen", flavour="reference", progress=False)
    info, _ = export_checkpoint(req, Registry(tmp_path / "registry"))
    assert Manifest.read(info.path).generation == wanted  # and nothing else (no token ids)


def test_missing_file_is_named(version_copy):
    (version_copy / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"missing tokenizer\.json"):
        Manifest.load(version_copy)


def test_changed_size_is_named(version_copy):
    with (version_copy / "model.onnx.data").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"changed model\.onnx\.data \(size"):
        Manifest.load(version_copy)


def test_same_size_change_needs_hashes(version_copy):
    path = version_copy / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    Manifest.load(version_copy)  # sizes match
    with pytest.raises(ManifestError, match=r"model\.onnx\.data \(sha256 differs\)"):
        Manifest.load(version_copy, verify_hashes=True)


def test_missing_or_invalid_manifest(version_copy, tmp_path):
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        Manifest.load(tmp_path)
    (version_copy / MANIFEST_NAME).write_text('{"name": "x"}')
    with pytest.raises(ManifestError, match="invalid manifest"):
        Manifest.load(version_copy)


def test_manifest_and_registry_stay_torch_free():
    import subprocess
    import sys

    code = (
        "import sys, export.manifest, export.registry; "
        "heavy = {'torch', 'onnx', 'models', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
