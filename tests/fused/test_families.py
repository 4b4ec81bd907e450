"""Every family's fused graph against transformers: long ragged prompts (past the windows and the
original rope lengths), cached steps, int8/int4 parity, and greedy decoding through the engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from export.graph_fused import build_fused_graph
from export.onnx_graph import save_model
from export.verify import verify
from export.weights import load_export_source
from models.random_checkpoint import FAMILY_KINDS
from tests.fused.runner import TrackedRunner

MAX_CONTEXT = 384
LENGTHS = (300, 170)  # two prompts of one batch, both past every window and original length
STEPS = 6


@pytest.fixture(scope="module")
def family_sources(family_checkpoints):
    return {kind: load_export_source(path) for kind, path in family_checkpoints.items()}


@pytest.fixture(scope="module")
def hf_models(family_checkpoints):
    import transformers

    return {
        kind: transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        for kind, path in family_checkpoints.items()
    }


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 384, n).tolist()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_fused_graph_matches_transformers_on_long_ragged_batches(kind, family_sources, hf_models):
    graph = build_fused_graph(family_sources[kind], precision="fp32", max_context=MAX_CONTEXT)
    runner = TrackedRunner(graph, slots=2)
    prompts = [_prompt(50 + r, n + STEPS) for r, n in enumerate(LENGTHS)]
    width = max(LENGTHS)
    padded = np.zeros((2, width), np.int64)
    for r, n in enumerate(LENGTHS):
        padded[r, :n] = prompts[r][:n]
    got = [runner.run(padded, counts=list(LENGTHS))]  # one right-padded prefill of both rows
    for s in range(STEPS):
        got.append(
            runner.run(np.array([[p[n + s]] for p, n in zip(prompts, LENGTHS, strict=True)]))
        )
    got = np.stack(got, axis=1)  # [rows, 1 + STEPS, vocab]
    for r, n in enumerate(LENGTHS):
        with torch.no_grad():
            want = hf_models[kind](torch.tensor([prompts[r]])).logits[0, n - 1 : n + STEPS]
        assert _rel(got[r], want.numpy()) < 1e-4, (kind, r)
        assert (got[r].argmax(-1) == want.numpy().argmax(-1)).all()


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_lower_precisions_pass_their_parity_thresholds(kind, precision, family_sources, tmp_path):
    src = family_sources[kind]
    graph = build_fused_graph(src, precision=precision, max_context=64)
    path = save_model(graph, tmp_path / "model.onnx")
    figures = verify(path, src, flavour="fused", precision=precision)
    assert figures["passed"], (kind, precision, figures["max_rel_error"], figures["top1_agreement"])


GREEDY_STEPS = 10


@pytest.fixture(scope="module")
def family_registry(family_checkpoints, tmp_path_factory):
    """A registry with one fused fp32 version per family kind (named after it)."""
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("family-registry"))
    for kind, path in family_checkpoints.items():
        req = ExportRequest(path, kind, flavour="fused", max_context=MAX_CONTEXT, progress=False)
        export_checkpoint(req, registry)
    return registry


async def _engine_greedy(registry, kind: str, prompts: list[list[int]]) -> list[list[int]]:
    from bot.engine import Engine, SamplingParams

    # min_new_tokens: stop tokens are banned on both sides (transformers' generate bans the eos
    # ids of the generation config, the engine the version's stop ids: the same ids here)
    params = SamplingParams(greedy=True, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS)
    engine = await Engine.start(kind, registry=registry.root, device="cpu", slots=len(prompts))
    try:
        streams = [engine.submit(p, params) for p in prompts]
        results = await asyncio.gather(*(s.collect() for s in streams))
    finally:
        await engine.close()
    return [r.token_ids for r in results]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_engine_batched_greedy_equals_transformers_generate(kind, family_registry, hf_models):
    prompts = [_prompt(60, 280), _prompt(61, 90), _prompt(62, 200)]
    got = asyncio.run(_engine_greedy(family_registry, kind, prompts))
    model = hf_models[kind]
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=GREEDY_STEPS,
                min_new_tokens=GREEDY_STEPS,
            )
        assert tokens == out[0, len(prompt) :].tolist(), kind


def test_several_stop_ids_reach_the_manifest(family_registry):
    """Llama 3's eos_token_id is a list (config and generation_config.json): all of them stop."""
    manifest = family_registry.resolve("llama3").manifest()
    assert {0, 2} <= set(manifest.tokenizer.stop_token_ids)
