"""Shared helpers for the model-core tests: loading our model and transformers' reference."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from models.model import CausalLM

KINDS = ("llama", "llama-untied", "qwen2", "gpt2")


def ours(folder: Path) -> CausalLM:
    return CausalLM.from_checkpoint(load_checkpoint(folder))


def reference(folder: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got - want).abs().max() / want.abs().max()).item()


def random_ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
