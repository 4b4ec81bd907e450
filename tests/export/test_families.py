"""Every family's reference graph (standard ONNX ops) against transformers: a left-padded batch
of long prompts, then a cached step fed back through the graph's own present outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.graph_reference import build_reference_graph
from export.runner import cpu_session
from export.weights import load_export_source
from models.random_checkpoint import FAMILY_KINDS

LENGTH, PAD = 260, 31


def _feeds(cfg, ids: np.ndarray, mask: np.ndarray, past: dict | None) -> dict:
    positions = np.maximum(mask.cumsum(-1) - 1, 0)[:, -ids.shape[1] :]
    positions[mask[:, -ids.shape[1] :] == 0] = 1
    empty = np.zeros((ids.shape[0], cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            feeds[name] = empty if past is None else past[name]
    return feeds


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_reference_graph_matches_transformers(kind, family_checkpoints):
    import transformers

    src = load_export_source(family_checkpoints[kind])
    cfg = src.config
    session = cpu_session(build_reference_graph(src).SerializeToString(), threads=2)
    outputs = [o.name for o in session.get_outputs()]
    ids = np.random.default_rng(70).integers(3, cfg.vocab_size, (2, LENGTH + 1))
    mask = np.ones_like(ids)
    mask[1, :PAD] = 0
    got, *presents = session.run(outputs, _feeds(cfg, ids[:, :LENGTH], mask[:, :LENGTH], None))
    names = [n.replace("present.", "past_key_values.") for n in outputs[1:]]
    past = dict(zip(names, presents, strict=True))
    step = session.run(["logits"], _feeds(cfg, ids[:, LENGTH:], mask, past))[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(family_checkpoints[kind]).eval()
    with torch.no_grad():
        want = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.concatenate([got, step], axis=1)
    real = mask.astype(bool)
    assert np.abs(got - want)[real].max() / np.abs(want).max() < 1e-5
