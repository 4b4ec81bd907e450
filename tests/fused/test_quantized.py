"""int8/int4 (MatMulNBits) and fp16 graphs: packing checked by ORT, logits within bounds."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph_fused import quantize_weight
from export.quantize import on_symmetric_grid, quantize_affine, quantize_blockwise
from tests.fused.conftest import KINDS
from tests.fused.runner import TrackedRunner

# Bounds from measurement (docs/performance.md, "Accuracy"): worst relative logit error over a
# prefill plus 16 steps on the tiny checkpoints, about 2x margin. Tiny random models have small
# top-1 margins, so quantized top-1 may flip; it must stay among the fp32 graph's top 5.
BOUNDS = {"fp16": (3e-3, 1.0), "int8": (4e-2, 0.8), "int4": (0.4, 0.7)}


def matmul_nbits(q, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    """Run one com.microsoft MatMulNBits node on x with the quantized weight q."""
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "S")]
    names = ["x", "B", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "Z"))
        names.append("Z")
    node = helper.make_node(
        "MatMulNBits",
        names,
        ["y"],
        domain="com.microsoft",
        K=q.k,
        N=q.n,
        bits=q.bits,
        block_size=q.block_size,
        accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [32, 64])
def test_packing_is_what_matmul_nbits_reads(bits, symmetric, block_size):
    rng = np.random.default_rng(bits + block_size)
    w = rng.standard_normal((48, 200)).astype(np.float32) * 0.05  # K not a multiple of the block
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    x = rng.standard_normal((2, 3, 200)).astype(np.float32)
    deq = q.dequantize()
    np.testing.assert_allclose(matmul_nbits(q, x), x @ deq.T, rtol=1e-5, atol=1e-5)
    # the quantization error per weight is at most half a step of its block
    scales = np.repeat(q.scales.reshape(48, -1), block_size, axis=1)[:, :200]
    assert np.all(np.abs(deq - w) <= scales * 0.5 + 1e-7)


def q4_1_weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A dequantized GGUF Q4_1 weight: per block of 32, fp16 d and m, w = d * q + m."""
    d = (rng.random((n, k // 32, 1)) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-rng.random((n, k // 32, 1)) * 0.08).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 puts a block's min at 0 and its max at 15
    return (d * q + m).reshape(n, k)


def q8_0_weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A dequantized GGUF Q8_0 weight: per block of 32, fp16 d, w = d * q, |q| <= 127."""
    d = (rng.random((n, k // 32, 1)) * 0.001 + 1e-4).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, k // 32, 32)).astype(np.float32)
    q[..., 0] = 127 * np.sign(rng.standard_normal((n, k // 32)))  # the block's |max| is 127 d
    return (d * q).reshape(n, k)


def test_q4_1_weights_are_reproduced_exactly():
    w = q4_1_weight(np.random.default_rng(1), 48, 192)
    for weight in (w, w * 0.125):  # also after folding the softmax scale into q rows
        q = quantize_affine(weight, bits=4, block_size=32)
        assert np.array_equal(q.dequantize(), weight)
    assert np.array_equal(quantize_weight(w, "int4").dequantize(), w)
    x = np.random.default_rng(2).standard_normal((3, 192)).astype(np.float32)
    # MatMulNBits sees scale * (q - zero point); the rest of each block's minimum is the
    # graph's own float term, block sums @ offsets.T: at most half a step where the block
    # straddles 0
    q = quantize_affine(w, bits=4, block_size=32)
    blocks = w.reshape(48, -1, 32)
    straddle = (blocks.min(-1) <= 0) & (blocks.max(-1) >= 0)
    half_step = q.scales.reshape(q.offsets.shape) * 0.5 + 1e-9
    assert straddle.any() and np.all(np.abs(q.offsets)[straddle] <= half_step[straddle])
    sums = x.reshape(3, -1, 32).sum(-1)
    np.testing.assert_allclose(
        matmul_nbits(q, x) + sums @ q.offsets.T, x @ w.T, rtol=1e-5, atol=1e-5
    )


def test_affine_rounds_weights_off_the_grid_within_half_a_step():
    w = np.random.default_rng(3).standard_normal((16, 100)).astype(np.float32)
    q = quantize_affine(w, bits=4, block_size=32)
    steps = np.repeat(q.scales.reshape(16, -1), 32, axis=1)[:, :100]
    assert np.all(np.abs(q.dequantize() - w) <= steps * 0.5 + 1e-6)
    assert not on_symmetric_grid(w, bits=8)


def test_q8_0_weights_stay_exact_8_bit_at_every_precision():
    w = q8_0_weight(np.random.default_rng(4), 40, 128)
    assert on_symmetric_grid(w, bits=8)
    for precision in ("int8", "int4"):
        q = quantize_weight(w, precision)
        assert (q.bits, q.zero_points) == (8, None)
        assert np.array_equal(q.dequantize(), w)


def test_zero_blocks_and_constant_blocks_survive():
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.25
    w[2, :32] = -1.0
    for symmetric in (False, True):
        q = quantize_blockwise(w, bits=4, block_size=32, symmetric=symmetric)
        np.testing.assert_allclose(q.dequantize(), w, atol=1e-6)
    assert np.array_equal(quantize_affine(w, bits=4, block_size=32).dequantize(), w)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits must be 4 or 8"),
        ({"bits": 4, "block_size": 24}, "block_size must be a power of two"),
    ],
)
def test_bad_quantization_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_blockwise(np.ones((4, 64), np.float32), **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_precision_within_measured_bounds(kind, precision, fused_graph):
    fp32 = TrackedRunner(fused_graph(kind, "fp32"), slots=1)
    other = TrackedRunner(fused_graph(kind, precision), slots=1)
    ids = np.random.default_rng(0).integers(3, 384, 20)
    pairs = [(other.run(ids[None, :4])[0], fp32.run(ids[None, :4])[0])]
    for t in range(4, 20):
        pairs.append((other.run(ids[None, [t]])[0], fp32.run(ids[None, [t]])[0]))
    max_err, min_top1 = BOUNDS[precision]
    errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in pairs]
    assert max(errs) < max_err
    assert np.mean([a.argmax() == b.argmax() for a, b in pairs]) >= min_top1
    assert all(a.argmax() in np.argsort(b)[-5:] for a, b in pairs)
    if precision != "fp16":
        ops = {n.op_type for n in fused_graph(kind, precision).graph.node}
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
        assert "Gemm" not in ops
        # float MatMuls only carry int4's per-block offsets: K -> K/32 block sums, then -> N
        for node in fused_graph(kind, precision).graph.node:
            if node.op_type == "MatMul":
                assert precision == "int4"
                assert node.name.endswith(("/block_sums", "/offsets"))


# A tied table is stored twice when quantized (GatherBlockQuantized + MatMulNBits), once in float;
# int4 also keeps a float offset per block (1/32 of the float weight).
@pytest.mark.parametrize(("precision", "ratio"), [("fp16", 0.5), ("int8", 0.4), ("int4", 0.28)])
def test_weight_bytes_shrink(precision, ratio, fused_graph):
    def weight_bytes(kind: str, p: str) -> int:
        return sum(len(t.raw_data) for t in fused_graph(kind, p).graph.initializer)

    for kind in ("llama", "gpt2"):
        assert weight_bytes(kind, precision) <= ratio * weight_bytes(kind, "fp32") + 4096
