"""Fixtures of the engine tests: fused versions of the tiny checkpoints, the PyTorch reference."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

KINDS = ("llama", "llama-untied", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def engine_registry(tiny_checkpoints, tmp_path_factory):
    """A registry with one fused fp32 version per tiny kind (named after the kind), plus
    `llama2`: the llama kind again as a second version (for hot swaps)."""
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("engine-registry"))
    for kind in KINDS:
        req = ExportRequest(tiny_checkpoints[kind], kind, flavour="fused", progress=False)
        export_checkpoint(req, registry)
    registry.use("llama")
    return registry


@pytest.fixture(scope="session")
def torch_models(tiny_checkpoints):
    """kind -> the PyTorch CausalLM of models.model (fp32, eval)."""
    from models.checkpoint import load_checkpoint
    from models.model import CausalLM

    return {
        kind: CausalLM.from_checkpoint(load_checkpoint(tiny_checkpoints[kind])).eval()
        for kind in KINDS
    }


def torch_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation with the PyTorch model (full recompute each step: no cache to trust)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def run(coro):
    """Run a coroutine on a fresh event loop (tests stay plain functions)."""
    return asyncio.run(coro)


def version_path(registry, ref: str) -> Path:
    return registry.resolve(ref).path
