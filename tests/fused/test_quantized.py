"""int8/int4 (MatMulNBits) and fp16 graphs: packing checked by ORT, logits within bounds."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import quantize_blockwise
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


def test_zero_blocks_and_constant_blocks_survive():
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.25
    w[2, :32] = -1.0
    for symmetric in (False, True):
        q = quantize_blockwise(w, bits=4, block_size=32, symmetric=symmetric)
        np.testing.assert_allclose(q.dequantize(), w, atol=1e-6)


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
        assert not ops & {"MatMul", "Gemm"}  # no float projection is left


# A tied table is stored twice when quantized (GatherBlockQuantized + MatMulNBits), once in float.
@pytest.mark.parametrize(("precision", "ratio"), [("fp16", 0.5), ("int8", 0.4), ("int4", 0.23)])
def test_weight_bytes_shrink(precision, ratio, fused_graph):
    def weight_bytes(kind: str, p: str) -> int:
        return sum(len(t.raw_data) for t in fused_graph(kind, p).graph.initializer)

    for kind in ("llama", "gpt2"):
        assert weight_bytes(kind, precision) <= ratio * weight_bytes(kind, "fp32") + 4096
