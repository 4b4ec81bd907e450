"""Time the fused graph alone (IO binding, shared KV buffers): prefill ms, decode tok/s.

Usage: python scripts/bench_graph.py CHECKPOINT_DIR [--precisions fp32,int4] [--batches 1,8]
Prints one JSON object per (precision, batch) and a summary object as the last line.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.graph_fused import build_fused_graph, save_graph
from export.weights import load_export_source


class Runner:
    """One session, one preallocated KV buffer per layer bound as past and present."""

    def __init__(
        self, model_path: Path, batch: int, max_context: int, opts: argparse.Namespace
    ) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opts.opt_level)
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if opts.spinning else "0"
        )
        if opts.no_prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        names = {i.name: i for i in self.sess.get_inputs()}
        first_kv = names["past_key_values.0.key"]
        kv_dtype = np.float16 if "float16" in first_kv.type else np.float32
        _, heads, _, head_dim = first_kv.shape
        self.has_positions = "position_ids" in names
        self.batch, self.max_context = batch, max_context
        self.kv = {}
        self.binding = self.sess.io_binding()
        for name in names:
            if name.startswith("past_key_values."):
                buf = np.zeros((batch, heads, max_context, head_dim), kv_dtype)
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                self.kv[name] = (buf, value)
                self.binding.bind_ortvalue_input(name, value)
                present = name.replace("past_key_values.", "present.")
                self.binding.bind_ortvalue_output(present, value)
        vocab = self.sess.get_outputs()[0].shape[1]
        self.logits = np.zeros((batch, vocab), np.float32)
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.seqlens = np.zeros(batch, np.int32)
        self.total = np.zeros((), np.int32)
        self.binding.bind_ortvalue_input(
            "seqlens_k", ort.OrtValue.ortvalue_from_numpy(self.seqlens)
        )
        self.binding.bind_ortvalue_input(
            "total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self.total)
        )
        self._step_ids = np.zeros((batch, 1), np.int64)
        self._step_pos = np.zeros((batch, 1), np.int64)
        self._step_values = (
            ort.OrtValue.ortvalue_from_numpy(self._step_ids),
            ort.OrtValue.ortvalue_from_numpy(self._step_pos),
        )

    def _bind_tokens(self, ids_value: ort.OrtValue, pos_value: ort.OrtValue) -> None:
        self.binding.bind_ortvalue_input("input_ids", ids_value)
        if self.has_positions:
            self.binding.bind_ortvalue_input("position_ids", pos_value)

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Prompt [batch, S] from an empty cache; returns the next tokens."""
        s = prompt.shape[1]
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), prompt.shape).copy()
        self._bind_tokens(
            ort.OrtValue.ortvalue_from_numpy(prompt), ort.OrtValue.ortvalue_from_numpy(pos)
        )
        self.seqlens[:] = s - 1
        self.total[...] = s
        self.sess.run_with_iobinding(self.binding)
        self._bind_tokens(*self._step_values)
        return self.logits.argmax(-1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One decode step for every row; inputs are updated in place."""
        self._step_ids[:, 0] = tokens
        self._step_pos[:, 0] = self.seqlens + 1
        self.seqlens += 1
        self.total[...] = self.seqlens.max() + 1
        self.sess.run_with_iobinding(self.binding)
        return self.logits.argmax(-1)


def timed_generation(
    runner: Runner, prompt_len: int, new_tokens: int, rng: np.random.Generator
) -> dict:
    prompt = rng.integers(3, 1000, (runner.batch, prompt_len), dtype=np.int64)
    t0 = time.perf_counter()
    tokens = runner.prefill(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens = runner.step(tokens)
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "decode_s": t2 - t1, "steps": new_tokens - 1}


def bench(model_path: Path, batch: int, args: argparse.Namespace) -> dict:
    runner = Runner(model_path, batch, args.max_context, args)
    rng = np.random.default_rng(0)
    timed_generation(runner, args.prompt_tokens, 8, rng)  # warm-up
    runs = [
        timed_generation(runner, args.prompt_tokens, args.new_tokens, rng)
        for _ in range(args.repeats)
    ]
    decode = [r["steps"] / r["decode_s"] for r in runs]
    result = {
        "batch": batch,
        "prefill_ms": round(statistics.median(r["prefill_ms"] for r in runs), 1),
        "decode_tok_s": round(statistics.median(decode), 1),
        "decode_tok_s_best": round(max(decode), 1),  # the least disturbed run on a shared machine
        "aggregate_tok_s": round(statistics.median(decode) * batch, 1),
        "decode_runs": [round(d, 1) for d in decode],
    }
    if batch == 1 and args.long_context:
        # per-token time with a long context: prefill to long_context, then a few steps
        long = timed_generation(runner, args.long_context, 33, rng)
        result[f"ms_per_token_at_{args.long_context}"] = round(
            long["decode_s"] / long["steps"] * 1e3, 2
        )
        result["ms_per_token_at_prompt"] = round(1e3 / statistics.median(decode), 2)
        result["long_prefill_ms"] = round(long["prefill_ms"], 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--long-context", type=int, default=1024, help="0 to skip the long-context figure"
    )
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--opt-level",
        default="ORT_ENABLE_ALL",
        choices=[g for g in dir(ort.GraphOptimizationLevel) if g.startswith("ORT_")],
    )
    ap.add_argument("--no-spinning", dest="spinning", action="store_false")
    ap.add_argument("--no-prepack", action="store_true")
    ap.add_argument(
        "--graph-dir",
        type=Path,
        default=Path("/tmp/bench-graph"),
        help="built graphs are cached here",
    )
    args = ap.parse_args()

    src = None
    summary = {}
    for precision in args.precisions.split(","):
        path = (
            args.graph_dir / f"{args.checkpoint.name}-{precision}-{args.max_context}" / "model.onnx"
        )
        if not path.exists():
            src = src or load_export_source(args.checkpoint)
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            save_graph(
                build_fused_graph(src, precision=precision, max_context=args.max_context), path
            )
            print(
                f"built {precision} in {time.perf_counter() - t0:.1f}s -> {path}", file=sys.stderr
            )
        for batch in map(int, args.batches.split(",")):
            result = {"precision": precision, **bench(path, batch, args)}
            print(json.dumps(result), flush=True)
            summary[f"{precision}/b{batch}"] = result["decode_tok_s"]
    print(
        json.dumps(
            {
                "decode_tok_s": summary,
                "threads": args.threads,
                "opt_level": args.opt_level,
                "spinning": args.spinning,
                "prepack": not args.no_prepack,
            }
        )
    )


if __name__ == "__main__":
    main()
