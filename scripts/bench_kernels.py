"""Time ONNX Runtime's CPU kernels that bound our decode step, alone, at SmolLM2-135M's shapes.

Usage: python scripts/bench_kernels.py [--threads 2] [--spin]
Prints one JSON object per measurement:
- `matmul`: MatMulNBits (int4, block 32, accuracy_level 4, as export writes it) against a float32
  MatMul, for the packed gate|up weight [3072, 576], over 1..128 rows: microseconds per op and
  multiply-accumulates per second. From 8 rows on, a compute-bound kernel's cost grows with the
  rows; a bandwidth-bound one's barely does.
- `attention`: 30 GroupQueryAttention nodes (9 query heads, 3 KV heads, head_dim 64, rotary, on
  2048-slot buffers shared by past and present, as the fused graph runs them) per run, for 1 and
  8 rows at 128 and 1024 cached tokens: milliseconds per run (one decode step's attention).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.graph_fused import ACCURACY_LEVEL, BLOCK_SIZE, IR_VERSION, MS
from export.quantize import quantize_blockwise

N, K, CHAIN = 3072, 576, 10  # gate|up of SmolLM2-135M; nodes per run (weights stay distinct)
HEADS, KV_HEADS, HEAD_DIM, SLOTS, LAYERS = 9, 3, 64, 2048, 30


def _model(nodes, inputs, outputs, initializers) -> bytes:
    graph = helper.make_graph(nodes, "kernels", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def matmul_model(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(CHAIN):
        w = rng.standard_normal((N, K)).astype(np.float32) * 0.02
        if kind == "fp32":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
            continue
        q = quantize_blockwise(w, bits=4, block_size=BLOCK_SIZE, symmetric=False)
        for name, value in (("w", q.packed), ("s", q.scales), ("z", q.zero_points)):
            inits.append(numpy_helper.from_array(value, f"{name}{i}"))
        attrs = dict(K=K, N=N, bits=4, block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL)
        nodes.append(
            helper.make_node(
                "MatMulNBits", ["x", f"w{i}", f"s{i}", f"z{i}"], [f"y{i}"], domain=MS, **attrs
            )
        )
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])]
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", N]) for i in range(CHAIN)]
    return _model(nodes, x, ys, inits)


def attention_model() -> bytes:
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inv = 1.0 / 100000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angles = np.outer(np.arange(SLOTS), inv)
    inits = [
        numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
        numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
    ]
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", 1, width]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    outputs, nodes = [], []
    kv_shape = ["b", KV_HEADS, SLOTS, HEAD_DIM]
    for i in range(LAYERS):
        for kind in "kv":
            inputs.append(
                helper.make_tensor_value_info(f"past_{kind}{i}", TensorProto.FLOAT, kv_shape)
            )
            outputs.append(
                helper.make_tensor_value_info(f"present_{kind}{i}", TensorProto.FLOAT, kv_shape)
            )
        outputs.append(
            helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, ["b", 1, HEADS * HEAD_DIM])
        )
        ins = ["qkv", "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"]
        outs = [f"o{i}", f"present_k{i}", f"present_v{i}"]
        attrs = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, scale=1.0)
        nodes.append(helper.make_node("GroupQueryAttention", ins, outs, domain=MS, **attrs))
    return _model(nodes, inputs, outputs, inits)


def session(model: bytes, args: argparse.Namespace) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.spin else "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def timed(run, repeats: int = 30) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_matmuls(args: argparse.Namespace) -> None:
    for kind in ("int4", "fp32"):
        sess = session(matmul_model(kind), args)
        for rows in (1, 8, 32, 128):
            x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
            per_op = timed(lambda: sess.run(None, {"x": x})) / CHAIN  # noqa: B023
            record = {"kernel": "matmul", "kind": kind, "rows": rows, "N": N, "K": K}
            record["us_per_op"] = round(per_op * 1e6, 1)
            record["gmac_s"] = round(rows * N * K / per_op / 1e9, 1)
            print(json.dumps(record), flush=True)


def _attention_binding(sess: ort.InferenceSession, rows: int, cached: int):
    """IO binding for one decode step of `rows` rows holding `cached` tokens each (and the arrays
    it points into, which must outlive it)."""
    binding, keep = sess.io_binding(), []

    def bind(name: str, array: np.ndarray, output: bool = False) -> None:
        keep.append(array)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, value)

    rng = np.random.default_rng(0)
    for i in range(LAYERS):
        for kind in "kv":
            buf = rng.random((rows, KV_HEADS, SLOTS, HEAD_DIM), np.float32)
            bind(f"past_{kind}{i}", buf)
            bind(f"present_{kind}{i}", buf, output=True)
        bind(f"o{i}", np.zeros((rows, 1, HEADS * HEAD_DIM), np.float32), output=True)
    bind("qkv", rng.random((rows, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM), np.float32))
    bind("seqlens_k", np.full(rows, cached, np.int32))
    bind("total", np.array(cached + 1, np.int32))
    return binding, keep


def bench_attention(args: argparse.Namespace) -> None:
    sess = session(attention_model(), args)
    for rows, cached in ((1, 128), (8, 128), (1, 1024), (8, 1024)):
        binding, _keep = _attention_binding(sess, rows, cached)
        ms = timed(lambda: sess.run_with_iobinding(binding)) * 1e3  # noqa: B023
        record = {"kernel": "attention", "layers": LAYERS, "rows": rows, "cached": cached}
        print(json.dumps({**record, "ms_per_step": round(ms, 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", action="store_true", help="let idle ORT threads spin")
    args = ap.parse_args()
    print(json.dumps({"onnxruntime": ort.__version__, "threads": args.threads, "spin": args.spin}))
    bench_matmuls(args)
    bench_attention(args)


if __name__ == "__main__":
    main()
