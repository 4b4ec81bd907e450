"""Greedy output of the engine equals the PyTorch model's, alone, batched and chunked."""

from __future__ import annotations

import asyncio

import pytest

from bot.engine import Engine, SamplingParams
from tests.engine.conftest import KINDS, run, torch_greedy

GREEDY = SamplingParams(greedy=True, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12, 13, 300, 301, 7, 6], [1, 77]]


async def _generate(registry, kind: str, prompts, slots: int = 4, **kw) -> list[list[int]]:
    engine = await Engine.start(kind, registry=registry.root, device="cpu", slots=slots, **kw)
    try:
        streams = [engine.submit(p, GREEDY) for p in prompts]
        results = await asyncio.gather(*(s.collect() for s in streams))
    finally:
        await engine.close()
    assert all(r.finish_reason == "length" for r in results)
    return [r.token_ids for r in results]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_pytorch_alone_and_batched(kind, engine_registry, torch_models):
    expected = [torch_greedy(torch_models[kind], p, GREEDY.max_new_tokens) for p in PROMPTS]
    alone = [run(_generate(engine_registry, kind, [p], slots=1))[0] for p in PROMPTS]
    batched = run(_generate(engine_registry, kind, PROMPTS, slots=4))
    assert alone == expected
    assert batched == expected


def test_more_requests_than_slots_and_chunked_prefill(engine_registry, torch_models):
    """6 requests on 2 slots (slots are reused), prompts fed 4 tokens per engine step."""
    prompts = [*PROMPTS, list(range(1, 40)), [1, 5, 5, 5, 5, 5, 5, 5, 5]]
    expected = [torch_greedy(torch_models["qwen2"], p, GREEDY.max_new_tokens) for p in prompts]
    got = run(_generate(engine_registry, "qwen2", prompts, slots=2, prefill_chunk=4))
    assert got == expected
