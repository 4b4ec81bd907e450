"""Verification: parity figures of good graphs, refusal of a corrupted one, the thresholds table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.manifest import PRECISIONS
from export.onnx_graph import save_model
from export.verify import THRESHOLDS, VerifyOptions, describe_failure, verify

SMALL = VerifyOptions(prompts=2, prompt_length=6, steps=4)


def test_reference_graph_passes_with_figures(sources, reference_graphs):
    figures = verify(
        reference_graphs["qwen2"], sources["qwen2"], flavour="reference", settings=SMALL
    )
    assert figures["passed"] is True
    assert [s["step"] for s in figures["per_step"]] == list(range(SMALL.steps + 1))
    assert 0 < figures["max_abs_error"] < 1e-4
    assert figures["max_rel_error"] < THRESHOLDS["fp32"].max_rel_error
    assert figures["top1_agreement"] == 1.0
    assert figures["thresholds"] == {"max_rel_error": 1e-4, "min_top1_agreement": 1.0}


def _perturbed(graph_path, out_dir, name: str, scale: float):
    model = onnx.load(str(graph_path))
    for init in model.graph.initializer:
        if init.name == name:
            w = numpy_helper.to_array(init)
            noisy = w + scale * np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), name))
            break
    else:
        raise AssertionError(f"no initializer {name}")
    out_dir.mkdir()
    return save_model(model, out_dir / "model.onnx")


def test_perturbed_weight_fails_verification(sources, reference_graphs, tmp_path):
    bad = _perturbed(
        reference_graphs["llama"], tmp_path / "bad", "model.layers.1.mlp.down_proj.weight", 0.01
    )
    figures = verify(bad, sources["llama"], flavour="reference", settings=SMALL)
    assert figures["passed"] is False
    assert figures["max_rel_error"] > THRESHOLDS["fp32"].max_rel_error
    assert "parity check failed" in describe_failure(figures)


def test_thresholds_cover_every_precision_and_tighten_with_bits():
    assert THRESHOLDS["fp32"].max_rel_error == 1e-4
    assert THRESHOLDS["fp32"].min_top1_agreement == 1.0
    assert set(THRESHOLDS) == set(PRECISIONS)  # every precision an export accepts is verified
    order = ["fp32", "fp16", "int8", "int4"]
    rel = [THRESHOLDS[p].max_rel_error for p in order]
    assert rel == sorted(rel)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fused_graph_passes_verification(kind, sources, tmp_path):
    from export.graph_fused import build_fused_graph

    model = build_fused_graph(sources[kind], precision="fp32", max_context=64)
    graph = save_model(model, tmp_path / "model.onnx")
    figures = verify(graph, sources[kind], flavour="fused", settings=SMALL)
    assert figures["passed"] is True, describe_failure(figures)
    assert figures["top1_agreement"] == 1.0
