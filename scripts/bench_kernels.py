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
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.graph_fused import FusedWriter, attention, rotary_caches
from export.runner import PAST, present_name
from models.random_checkpoint import SMOLLM2_135M

K = SMOLLM2_135M["hidden_size"]
N, CHAIN = 2 * SMOLLM2_135M["intermediate_size"], 10  # gate|up; nodes per run, all distinct
LAYERS = SMOLLM2_135M["num_hidden_layers"]
SMOLLM2 = SimpleNamespace(
    num_heads=SMOLLM2_135M["num_attention_heads"],
    num_kv_heads=SMOLLM2_135M["num_key_value_heads"],
    head_dim=SMOLLM2_135M["hidden_size"] // SMOLLM2_135M["num_attention_heads"],
    rope_theta=SMOLLM2_135M["rope_theta"],
)
SLOTS = 2048  # the fused graph's default max context
QKV_WIDTH = (SMOLLM2.num_heads + 2 * SMOLLM2.num_kv_heads) * SMOLLM2.head_dim


def _model(g: FusedWriter, inputs: list, outputs: list) -> bytes:
    return g.model("kernels", inputs, outputs).SerializeToString()


def _value(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def matmul_model(precision: str) -> bytes:
    """CHAIN [N, K] linears written by the exporter's own graph writer (so int4 is exactly the
    MatMulNBits node, block and accuracy level that `python -m export` emits)."""
    g, rng = FusedWriter(precision), np.random.default_rng(0)
    ys = [g.linear("x", rng.standard_normal((N, K)) * 0.02, f"mm{i}") for i in range(CHAIN)]
    outputs = [_value(y, TensorProto.FLOAT, ["m", N]) for y in ys]
    return _model(g, [_value("x", TensorProto.FLOAT, ["m", K])], outputs)


def attention_model() -> bytes:
    """LAYERS GroupQueryAttention nodes as the fused graph writes them, all on the same packed
    QKV input, each on its own KV buffers (the names of the graph contract)."""
    g, cfg = FusedWriter("fp32"), SMOLLM2
    cos, sin = rotary_caches(cfg.head_dim, cfg.rope_theta, SLOTS)
    g.weight("cos_cache", cos)
    g.weight("sin_cache", sin)
    kv_shape = ["b", cfg.num_kv_heads, SLOTS, cfg.head_dim]
    inputs = [
        _value("qkv", TensorProto.FLOAT, ["b", 1, QKV_WIDTH]),
        _value("seqlens_k", TensorProto.INT32, ["b"]),
        _value("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = []
    for i in range(LAYERS):
        out = attention(g, cfg, i, "qkv", rotary=True)
        outputs.append(_value(out, TensorProto.FLOAT, ["b", 1, cfg.num_heads * cfg.head_dim]))
        for kind in ("key", "value"):
            past = f"{PAST}{i}.{kind}"
            inputs.append(_value(past, TensorProto.FLOAT, kv_shape))
            outputs.append(_value(present_name(past), TensorProto.FLOAT, kv_shape))
    return _model(g, inputs, outputs)


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

    rng, cfg = np.random.default_rng(0), SMOLLM2
    for i in range(LAYERS):
        for kind in ("key", "value"):
            buf = rng.random((rows, cfg.num_kv_heads, SLOTS, cfg.head_dim), np.float32)
            past = f"{PAST}{i}.{kind}"
            bind(past, buf)  # filled: zeros would read the zero page
            bind(present_name(past), buf, output=True)
        width = cfg.num_heads * cfg.head_dim
        bind(f"layers.{i}.attn", np.zeros((rows, 1, width), np.float32), output=True)
    bind("qkv", rng.random((rows, 1, QKV_WIDTH), np.float32))
    bind("seqlens_k", np.full(rows, cached, np.int32))
    bind("total_sequence_length", np.array(cached + 1, np.int32))
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
