"""Fused-graph test fixtures: sources, built graphs and the PyTorch reference per tiny kind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from export.graph_fused import build_fused_graph
from export.weights import load_export_source

KINDS = ("llama", "llama-untied", "qwen2", "gpt2")
MAX_CONTEXT = 64


@pytest.fixture(scope="session")
def sources(tiny_checkpoints: dict[str, Path]) -> dict[str, Any]:
    return {kind: load_export_source(path) for kind, path in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def fused_graph(sources) -> Callable[[str, str], onnx.ModelProto]:
    """fused_graph(kind, precision), built once per pair."""
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(kind: str, precision: str) -> onnx.ModelProto:
        if (kind, precision) not in cache:
            cache[kind, precision] = build_fused_graph(
                sources[kind], precision=precision, max_context=MAX_CONTEXT
            )
        return cache[kind, precision]

    return get


@pytest.fixture(scope="session")
def reference(tiny_checkpoints) -> Callable[[str, list[int]], np.ndarray]:
    """reference(kind, ids): the PyTorch CausalLM's last-position logits for one sequence."""
    from models.checkpoint import load_checkpoint
    from models.model import CausalLM

    models = {k: CausalLM.from_checkpoint(load_checkpoint(p)) for k, p in tiny_checkpoints.items()}

    def logits(kind: str, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out, _ = models[kind](torch.tensor([ids]))
        return out[0, -1].numpy()

    return logits
