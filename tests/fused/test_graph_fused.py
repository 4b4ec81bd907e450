"""The fused graph vs the PyTorch model: cached steps, ragged batches, chunked prefill, I/O."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from export.graph_fused import build_fused_graph
from export.onnx_graph import save_model
from tests.fused.conftest import KINDS, MAX_CONTEXT
from tests.fused.runner import TrackedRunner


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def prompt(seed: int, n: int, vocab: int = 384) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4"])
def test_io_contract(kind, precision, fused_graph, sources):
    cfg = sources[kind].config
    graph = fused_graph(kind, precision).graph
    kv = [cfg.num_kv_heads, MAX_CONTEXT, cfg.head_dim]

    def dims(v: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    def sig(values) -> dict:
        return {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in values}

    f32, i32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64
    kv_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else f32
    want_in = {"input_ids": (i64, ["batch", "seq"])}
    if cfg.family == "gpt2":
        want_in["position_ids"] = (i64, ["batch", "seq"])
    want_in |= {"seqlens_k": (i32, ["batch"]), "total_sequence_length": (i32, [])}
    want_in["last_index"] = (i64, ["batch"])
    want_out = {"logits": (f32, ["batch", cfg.vocab_size])}
    for i in range(cfg.num_layers):
        for part in ("key", "value"):
            want_in[f"past_key_values.{i}.{part}"] = (kv_type, ["batch", *kv])
            want_out[f"present.{i}.{part}"] = (kv_type, ["batch", *kv])
    assert sig(graph.input) == want_in
    assert sig(graph.output) == want_out
    ops = {n.op_type for n in graph.node}
    assert "GroupQueryAttention" in ops
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == cfg.num_layers
    # the softmax scale lives in the q weights: with scale 1.0 ORT's CPU kernel takes its
    # one-row path for a decode step instead of re-packing the K cache (see _packed_qkv)
    scales = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [s.get("scale") for s in scales] == [1.0] * cfg.num_layers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4"])
def test_no_node_derives_the_last_positions_from_shapes(kind, precision, fused_graph):
    """The rows' last positions come in as `last_index`: no Shape op anywhere (the CUDA provider
    places a Shape -> Gather chain on the CPU, and its host copy forbids CUDA-graph capture)."""
    graph = fused_graph(kind, precision).graph
    assert "Shape" not in {n.op_type for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}

    def ancestors(name: str) -> set[str]:
        node = producer.get(name)
        if node is None:  # a graph input or an initializer
            return {name}
        return {node.op_type}.union(*(ancestors(i) for i in node.input if i))

    gathers = [n for n in graph.node if n.op_type == "GatherND"]
    assert len(gathers) == 2  # the last position of the residual stream and of the pending sum
    for node in gathers:
        assert ancestors(node.input[1]) == {"Unsqueeze", "last_index", "last/axes"}


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_cached_steps_match_pytorch(kind, fused_graph, reference):
    runner = TrackedRunner(fused_graph(kind, "fp32"), slots=1)
    ids = prompt(1, 9)
    logits = runner.run(np.array([ids]))[0]
    for step in range(12):
        ref = reference(kind, ids)
        assert rel_err(logits, ref) < 1e-4, f"step {step}"
        assert logits.argmax() == ref.argmax(), f"step {step}"
        ids.append(int(ref.argmax()) if step % 2 else (step * 37) % 384)
        logits = runner.run(np.array([[ids[-1]]]))[0]


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_batch_equals_rows_alone(kind, fused_graph):
    graph = fused_graph(kind, "fp32")
    rows = [prompt(10 + r, n) for r, n in enumerate((3, 8, 5))]
    batched = TrackedRunner(graph, slots=3)
    width = max(map(len, rows))
    padded = np.zeros((3, width), np.int64)
    for r, ids in enumerate(rows):
        padded[r, : len(ids)] = ids
    steps = [batched.run(padded, counts=[len(r) for r in rows])]
    for t in range(5):
        steps.append(batched.run(np.array([[7 + t], [50 + t], [200 + t]])))
    for r, ids in enumerate(rows):
        alone = TrackedRunner(graph, slots=1)
        got = [alone.run(np.array([ids]))[0]]
        for t in range(5):
            got.append(alone.run(np.array([[(7, 50, 200)[r] + t]]))[0])
        for t, logits in enumerate(got):
            np.testing.assert_allclose(
                steps[t][r], logits, rtol=0, atol=1e-5 * np.abs(logits).max()
            )


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_on_one_slot_matches_pytorch(kind, fused_graph, reference):
    runner = TrackedRunner(fused_graph(kind, "fp32"), slots=2)
    runner.run(np.array([[5], [6]]))  # the other slot holds a sequence too
    ids = prompt(3, 14)
    first = runner.run(np.array([ids[:6]]), slot=0)[0]
    assert rel_err(first, reference(kind, [5, *ids[:6]])) < 1e-4
    second = runner.run(np.array([ids[6:]]), slot=0)[0]
    ref = reference(kind, [5, *ids])
    assert rel_err(second, ref) < 1e-4
    assert second.argmax() == ref.argmax()
    after = runner.run(np.array([[9], [10]]))  # a decode step for both slots afterwards
    assert rel_err(after[0], reference(kind, [5, *ids, 9])) < 1e-4
    assert rel_err(after[1], reference(kind, [6, 10])) < 1e-4


def test_save_graph_writes_one_data_file(tmp_path, sources, fused_graph, reference):
    path = save_model(fused_graph("llama", "fp32"), tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert path.stat().st_size < 200_000  # the weights live in the data file
    runner = TrackedRunner(onnx.load(str(path)), slots=1)
    ids = prompt(4, 5)
    assert rel_err(runner.run(np.array([ids]))[0], reference("llama", ids)) < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int3", "max_context": 32}, "unknown precision"),
        ({"precision": "fp32", "max_context": 10_000}, "max_context must be in 1..256"),
        ({"precision": "fp32", "max_context": 0}, "max_context must be in"),
    ],
)
def test_bad_arguments_are_one_line_errors(sources, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_fused_graph(sources["llama"], **kwargs)


def test_saved_model_stays_usable_in_memory(tmp_path, fused_graph):
    model = fused_graph("gpt2", "fp32")
    before = TrackedRunner(model, slots=1).run(np.array([prompt(5, 4)]))
    save_model(model, tmp_path / "model.onnx")
    after = TrackedRunner(model, slots=1).run(np.array([prompt(5, 4)]))
    np.testing.assert_array_equal(before, after)


def test_llama_with_attention_bias_matches_transformers(tmp_path, tiny_checkpoints):
    """Llama's attention_bias adds q/k/v and o_proj biases (transformers' layout)."""
    import torch
    import transformers as tf

    from export.weights import load_export_source

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        attention_bias=True, tie_word_embeddings=False,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoints["llama"] / name, tmp_path / name)
    src = load_export_source(tmp_path)
    graph = build_fused_graph(src, precision="fp32", max_context=32)
    assert {"layers.0.qkv_proj/bias", "layers.0.o_proj/bias"} <= {n.name for n in graph.graph.node}
    runner = TrackedRunner(graph, slots=1)
    ids = prompt(6, 7)
    got = [runner.run(np.array([ids]))[0], runner.run(np.array([[5]]))[0]]
    with torch.no_grad():
        ref = model(torch.tensor([[*ids, 5]])).logits[0].numpy()
    assert rel_err(got[0], ref[-2]) < 1e-4
    assert rel_err(got[1], ref[-1]) < 1e-4


def test_quantized_embedding_needs_whole_blocks(sources):
    src = sources["llama"]
    odd = SimpleNamespace(config=dataclasses.replace(src.config, hidden_size=48), tensors={})
    with pytest.raises(ValueError, match="int4 needs hidden_size divisible by 32"):
        build_fused_graph(odd, precision="int4", max_context=32)
