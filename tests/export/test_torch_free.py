"""The build without torch: a GGUF file -> numpy -> ONNX, verified against the reference graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.gguf_source import llama_tensor_shapes, load_gguf_source
from export.graph_fused import build_fused_graph
from export.onnx_graph import GRAPH_FILE, save_model
from export.pipeline import ExportError, ExportRequest, export_checkpoint
from export.registry import Registry
from export.verify import reference_graph_logits, torch_logits, verify
from export.weights import load_export_source, reference_model
from models.checkpoint import read_config
from models.errors import ModelError
from models.model import hf_tensor_shapes
from tests.models_io.gguf_files import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny Llama as an F32 GGUF file (its weights exactly the HF folder's)."""
    return write_tiny_llama(tiny_checkpoints["llama"], tmp_path_factory.mktemp("gguf") / "t.gguf")


def _files(manifest) -> dict[str, str]:
    return {f.name: f.sha256 for f in manifest.files}


def test_a_gguf_builds_without_torch_into_the_same_graph_as_through_torch(tiny_gguf, tmp_path):
    registry = Registry(tmp_path / "registry")
    light = ExportRequest(tiny_gguf, "light", progress=False, torch_free=True)
    full = ExportRequest(tiny_gguf, "full", progress=False)
    _, light_manifest = export_checkpoint(light, registry)
    _, full_manifest = export_checkpoint(full, registry)
    assert light_manifest.parity.passed and full_manifest.parity.passed
    # the fused graph against the reference graph of the same weights, both fp32 through ORT
    assert light_manifest.parity.max_rel_error < 1e-5
    assert light_manifest.parity.top1_agreement == 1.0
    # numpy from the GGUF gives the very weights and graph the torch loader gives
    light_files, full_files = _files(light_manifest), _files(full_manifest)
    assert light_files[GRAPH_FILE] == full_files[GRAPH_FILE]
    assert light_files[GRAPH_FILE + ".data"] == full_files[GRAPH_FILE + ".data"]
    assert light_manifest.source.kind == "gguf"
    assert light_manifest.tokenizer == full_manifest.tokenizer


def test_generation_settings_given_with_the_request_reach_the_manifest(tiny_gguf, tmp_path):
    sampling = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
    req = ExportRequest(tiny_gguf, "tiny", progress=False, torch_free=True, generation=sampling)
    _, manifest = export_checkpoint(req, Registry(tmp_path))
    assert {k: manifest.generation[k] for k in sampling} == sampling
    assert manifest.tokenizer.stop_token_ids  # the file's own end-of-text id still stops


def test_a_quantized_build_without_torch_passes_its_thresholds(tiny_gguf, tmp_path):
    req = ExportRequest(tiny_gguf, "tiny", precision="int8", progress=False, torch_free=True)
    _, manifest = export_checkpoint(req, Registry(tmp_path))
    assert manifest.precision == "int8" and manifest.parity.passed
    assert 0 < manifest.parity.max_rel_error < manifest.parity.thresholds["max_rel_error"]


def test_the_reference_verification_fails_a_graph_of_other_weights(tiny_gguf, tmp_path):
    src = load_gguf_source(tiny_gguf)
    wrong = load_gguf_source(tiny_gguf)
    for name in wrong.tensors:
        if name.endswith("mlp.down_proj.weight"):
            wrong.tensors[name] = wrong.tensors[name] * 4.0
    graph = save_model(build_fused_graph(wrong, precision="fp32", max_context=64), tmp_path / "g")
    figures = verify(graph, src, flavour="fused", against="reference")
    assert not figures["passed"]
    assert figures["max_rel_error"] > figures["thresholds"]["max_rel_error"]


def test_the_reference_graph_gives_the_torch_models_logits(tiny_gguf):
    src = load_gguf_source(tiny_gguf)
    tokens = np.random.default_rng(0).integers(0, src.config.vocab_size, (2, 12))
    got = reference_graph_logits(src, tokens)
    want = torch_logits(reference_model(src), tokens)
    assert got.shape == want.shape == (2, 12, src.config.vocab_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["llama", "llama-untied", "qwen2"])
def test_llama_tensor_shapes_are_the_models(tiny_checkpoints, kind):
    config = read_config(tiny_checkpoints[kind])
    assert llama_tensor_shapes(config) == hf_tensor_shapes(config)


@pytest.mark.parametrize("bias", [True, False])
def test_llama_tensor_shapes_with_and_without_biases(tiny_checkpoints, bias):
    config = read_config(tiny_checkpoints["llama"])
    config.attention_bias = bias
    assert llama_tensor_shapes(config) == hf_tensor_shapes(config)


def test_the_gguf_loader_gives_the_checkpoint_loaders_tensors(tiny_gguf):
    ours, theirs = load_gguf_source(tiny_gguf), load_export_source(tiny_gguf)
    assert ours.config == theirs.config and ours.tensors.keys() == theirs.tensors.keys()
    for name, values in ours.tensors.items():
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, theirs.tensors[name], err_msg=name)


def test_a_tensor_of_the_wrong_shape_is_one_line(tiny_checkpoints, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in tiny_checkpoints["llama"].iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] += 1  # the GGUF's metadata then disagrees with its tensors
    (hf / "config.json").write_text(json.dumps(config))
    path = write_tiny_llama(hf, tmp_path / "bad.gguf")
    with pytest.raises(ModelError, match=r"bad\.gguf: tensor model\.layers\.0\.mlp\.\w+_proj"):
        load_gguf_source(path)


def test_the_build_without_torch_reads_gguf_files_only(tiny_checkpoints, tmp_path):
    req = ExportRequest(tiny_checkpoints["llama"], "tiny", torch_free=True, progress=False)
    with pytest.raises(ExportError, match=r"without torch reads \.gguf files only"):
        export_checkpoint(req, Registry(tmp_path))
    assert not (tmp_path / "tiny").exists()


def test_a_gguf_is_read_once_per_file_version(tiny_checkpoints, tmp_path):
    from gguf import GGMLQuantizationType

    path = write_tiny_llama(tiny_checkpoints["llama"], tmp_path / "m.gguf")
    first, again = load_gguf_source(path), load_gguf_source(path, {"temperature": 0.2})
    name = "model.layers.0.mlp.up_proj.weight"
    assert again.tensors[name] is first.tensors[name] and again.tensors is not first.tensors
    assert again.generation_config["temperature"] == 0.2
    assert "temperature" not in first.generation_config
    write_tiny_llama(tiny_checkpoints["llama"], path, quant=GGMLQuantizationType.Q8_0)
    changed = load_gguf_source(path)
    assert changed.source_files[0].sha256 != first.source_files[0].sha256
    assert not np.array_equal(changed.tensors[name], first.tensors[name])
