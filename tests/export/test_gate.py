"""The quality gate: greedy answers through a graph, compared with fp32's; ensure-default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import gate
from export.__main__ import main
from export.graph_fused import build_fused_graph
from export.manifest import Manifest
from export.onnx_graph import save_model
from export.pipeline import ExportRequest, GateError, _tokenizer_info, export_checkpoint
from export.registry import Registry
from export.weights import load_export_source, reference_model


def torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_answers_of_ragged_batches_equal_pytorch(kind, tiny_checkpoints, tmp_path):
    src = load_export_source(tiny_checkpoints[kind])
    graph = save_model(
        build_fused_graph(src, precision="fp32", max_context=128), tmp_path / "model.onnx"
    )
    prompts = gate.render_prompts(src.tokenizer, stop_ids=[])
    assert len(prompts.ids) == len(gate.PROMPTS) >= 24
    assert len({len(p) for p in prompts.ids}) > 1  # rows of different lengths share a batch
    answers = gate.greedy_answers(graph, prompts, new_tokens=6)
    model = reference_model(src).eval()
    for prompt, answer in zip(prompts.ids[:6], answers[:6], strict=True):
        assert answer == torch_greedy(model, prompt, 6)


def test_answers_are_cut_after_the_first_stop_token(tiny_checkpoints, tmp_path):
    src = load_export_source(tiny_checkpoints["llama"])
    graph = save_model(
        build_fused_graph(src, precision="fp32", max_context=128), tmp_path / "model.onnx"
    )
    full = gate.greedy_answers(graph, gate.render_prompts(src.tokenizer, []), new_tokens=8)
    stop = full[0][2]
    cut = gate.greedy_answers(graph, gate.render_prompts(src.tokenizer, [stop]), new_tokens=8)
    assert cut[0] == full[0][: full[0].index(stop) + 1]


def _answers(differing: set[int], example: list[int]) -> list[list[int]]:
    answers = [[i, i + 1] for i in range(len(gate.PROMPTS))]
    answers[0] = example
    return [[*a, 99] if i in differing else a for i, a in enumerate(answers)]


@pytest.mark.parametrize(
    ("precision", "differing", "example", "passed"),
    [
        ("int8", {3, 4}, "Paris.", True),
        ("int8", {3, 4, 5}, "Paris.", False),  # 21 of 24: int8 needs 22
        ("int4", {3, 4, 5, 6}, "The capital of France is Paris.", True),
        ("int4", {3, 4, 5, 6, 7}, "Paris", False),  # 19 of 24: int4 needs 20
        ("int8", set(), "L'Étoile, la Marseur", False),  # README's example answered wrong
        ("fp32", set(), "paris", True),
    ],
)
def test_the_gate_counts_equal_answers_and_checks_the_example(
    precision, differing, example, passed
):
    reference = _answers(set(), [0])
    answers = _answers(differing, [0] if 0 not in differing else [1])
    figures = gate.evaluate(answers, reference, precision, lambda ids: example, seconds=1.0)
    assert figures["answers_equal"] == len(gate.PROMPTS) - len(differing)
    assert figures["differing"] == sorted(differing)
    assert figures["min_equal"] == gate.MIN_EQUAL[precision]
    assert figures["example_answer"] == example
    assert figures["passed"] is passed


def test_every_export_records_the_gate_and_a_required_gate_refuses(tiny_checkpoints, tmp_path):
    registry = Registry(tmp_path / "registry")
    req = ExportRequest(tiny_checkpoints["llama"], "tiny", precision="int8", progress=False)
    _, manifest = export_checkpoint(req, registry)
    g = manifest.gate
    assert g is not None and g.prompts == len(gate.PROMPTS) and g.new_tokens == gate.NEW_TOKENS
    assert g.example_prompt == "What is the capital of France?"
    assert not g.example_correct and not g.passed  # a random model knows no capitals
    assert Manifest.read(registry.resolve("tiny@1").path).gate == g
    required = ExportRequest(
        tiny_checkpoints["llama"], "tiny", precision="int4", progress=False, require_gate=True
    )
    with pytest.raises(GateError, match="quality gate FAILED"):
        export_checkpoint(required, registry)
    assert [v.ref for v in registry.versions()] == ["tiny@1"]  # nothing published


def test_a_graph_too_short_for_the_prompts_records_no_gate(tiny_checkpoints, tmp_path):
    registry = Registry(tmp_path / "registry")
    req = ExportRequest(tiny_checkpoints["llama"], "tiny", max_context=32, progress=False)
    _, manifest = export_checkpoint(req, registry)
    assert manifest.gate is None
    required = ExportRequest(
        tiny_checkpoints["llama"], "tiny", max_context=32, progress=False, require_gate=True
    )
    with pytest.raises(GateError, match="quality gate not run"):
        export_checkpoint(required, registry)


def test_ensure_default_publishes_the_first_candidate_that_passes(
    capsys, monkeypatch, tiny_checkpoints, tmp_path
):
    # what a passing model looks like: the example's answer accepted, every answer counted
    monkeypatch.setattr(gate, "EXAMPLE_EXPECTED", "")
    monkeypatch.setattr(gate, "MIN_EQUAL", {**gate.MIN_EQUAL, "int8": 0})
    monkeypatch.setattr("export.__main__.serving_candidates", lambda: ("int8", "int4"))
    registry = tmp_path / "registry"
    args = ["ensure-default", str(tiny_checkpoints["llama"]), "--name", "tiny", "--quiet"]
    assert main([*args, "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.read(Registry(registry).active().path)
    assert manifest.precision == "int8" and manifest.gate.passed
    assert "quality gate passed" in out and "not serving" not in out
    code = main(["show", "tiny@1", "--registry", str(registry)])
    assert code == 0 and "quality gate passed" in capsys.readouterr().out


def test_the_gate_prompts_fit_the_tiny_models_and_stop_ids_come_from_the_manifest(
    tiny_checkpoints,
):
    src = load_export_source(tiny_checkpoints["qwen2"])
    stops = _tokenizer_info(src).stop_token_ids
    prompts = gate.render_prompts(src.tokenizer, stops)
    assert prompts.stop_ids == frozenset(stops) and stops
    text = src.tokenizer.decode(prompts.ids[0])
    assert "What is the capital of France?" in text and text.endswith("assistant\n")
    assert max(len(p) for p in prompts.ids) + gate.NEW_TOKENS <= 256
    assert np.all([len(p) > 5 for p in prompts.ids])
