"""The reference graph run with a plain ONNX Runtime loop against our CausalLM and transformers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.weights import reference_model
from tests.export.conftest import KINDS

STEPS = 3


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two prompts of 7 tokens, the second left-padded by 3; the continuation tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    ids[1, :3] = 0  # pad id
    return ids, mask, rng.integers(3, vocab, (2, STEPS))


def _positions(mask: np.ndarray, seq: int) -> np.ndarray:
    """As transformers' generate: cumsum of the mask - 1, padding at 1; the last `seq` columns."""
    pos = mask.cumsum(-1) - 1
    pos[mask == 0] = 1
    return pos[:, -seq:]


def _ort_loop(session, cfg, ids, mask, continuation) -> list[np.ndarray]:
    """Prefill, then one token per step with past = the previous present; logits per call."""
    past = {
        f"past_key_values.{i}.{kind}": np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
        for i in range(cfg.num_layers)
        for kind in ("key", "value")
    }
    names = [o.name for o in session.get_outputs()]
    results, feed_ids = [], ids
    for step in range(STEPS + 1):
        feeds = {
            "input_ids": feed_ids,
            "attention_mask": mask,
            "position_ids": _positions(mask, feed_ids.shape[1]),
            **past,
        }
        out = dict(zip(names, session.run(names, feeds), strict=True))
        results.append(out["logits"])
        past = {
            n.replace("present.", "past_key_values."): v for n, v in out.items() if n != "logits"
        }
        total = mask.shape[1]
        assert out["present.0.key"].shape == (2, cfg.num_kv_heads, total, cfg.head_dim)
        if step < STEPS:
            feed_ids = continuation[:, step : step + 1]
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    return results


def _assert_close(got: np.ndarray, want: np.ndarray, real: np.ndarray) -> None:
    """Real (unpadded) positions agree to 1e-4 of the logit scale and in their argmax."""
    got, want = got[real], want[real]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_plain_ort_loop_matches_causallm_with_left_padding(kind, sources, reference_graphs):
    src = sources[kind]
    ids, mask, continuation = _batch(src.config.vocab_size)
    got = _ort_loop(_session(reference_graphs[kind]), src.config, ids, mask, continuation)
    model = reference_model(src)
    with torch.no_grad():
        logits, past = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        _assert_close(got[0], logits.numpy(), mask == 1)
        full_mask = mask
        for step in range(STEPS):
            full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], axis=1)
            token = torch.from_numpy(continuation[:, step : step + 1])
            logits, past = model(
                token, past_key_values=past, attention_mask=torch.from_numpy(full_mask)
            )
            _assert_close(got[step + 1], logits.numpy(), np.ones((2, 1), bool))


@pytest.mark.parametrize("kind", KINDS)
def test_plain_ort_loop_matches_transformers(kind, sources, reference_graphs, tiny_checkpoints):
    import transformers

    src = sources[kind]
    ids, mask, continuation = _batch(src.config.vocab_size, seed=1)
    got = _ort_loop(_session(reference_graphs[kind]), src.config, ids, mask, continuation)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints[kind], attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(_positions(mask, ids.shape[1])),
            use_cache=True,
        )
        _assert_close(got[0], out.logits.numpy(), mask == 1)
        full_mask = mask
        for step in range(STEPS):
            full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], axis=1)
            out = hf(
                input_ids=torch.from_numpy(continuation[:, step : step + 1]),
                attention_mask=torch.from_numpy(full_mask),
                position_ids=torch.from_numpy(_positions(full_mask, 1)),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            _assert_close(got[step + 1], out.logits.numpy(), np.ones((2, 1), bool))


@pytest.mark.parametrize("kind", KINDS)
def test_io_names_and_shapes_are_those_optimum_expects(kind, sources, reference_graphs):
    """The names, dtypes and dynamic axes optimum's ORTModelForCausalLM binds (not installed)."""
    cfg = sources[kind].config
    session = _session(reference_graphs[kind])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    layers = range(cfg.num_layers)
    kv = [f"{i}.{k}" for i in layers for k in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{n}" for n in kv
    ]
    assert list(outputs) == ["logits"] + [f"present.{n}" for n in kv]
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert inputs[name].type == "tensor(int64)"
        assert all(isinstance(d, str) for d in inputs[name].shape)  # batch and sequence are dynamic
    past, present = inputs["past_key_values.0.key"], outputs["present.0.key"]
    assert past.type == present.type == "tensor(float)"
    assert isinstance(past.shape[0], str) and isinstance(past.shape[2], str)
    assert past.shape[1] == cfg.num_kv_heads and past.shape[3] == cfg.head_dim
    assert outputs["logits"].shape[2] == cfg.vocab_size and isinstance(
        outputs["logits"].shape[1], str
    )


@pytest.mark.parametrize("kind", KINDS)
def test_graph_is_standard_ops_with_one_external_data_file(kind, reference_graphs):
    path = reference_graphs[kind]
    model = onnx.load(str(path), load_external_data=False)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert next(o.version for o in model.opset_import) >= 17
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    locations = {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"model.onnx.data"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(path))
