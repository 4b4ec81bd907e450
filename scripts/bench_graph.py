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

from export.graph_fused import build_fused_graph
from export.onnx_graph import save_model
from export.runner import FusedRunner
from export.weights import load_export_source


class Runner:
    """One session driven by export.runner (shared KV buffers bound as past and present)."""

    def __init__(self, model_path: Path, batch: int, opts: argparse.Namespace) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opts.opt_level)
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if opts.spinning else "0"
        )
        if opts.no_prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        self.graph, self.batch = FusedRunner(sess, batch), batch

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Prompt [batch, S] from an empty cache; returns the next tokens."""
        logits = self.graph.run(0, prompt, np.zeros(self.batch, np.int64))
        self.graph.seqlens[:] = prompt.shape[1]
        return logits.argmax(-1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One decode step for every row (its inputs are written in place)."""
        self.graph.ids[:, 0] = tokens
        logits = self.graph.decode(0, self.batch)
        self.graph.seqlens += 1
        return logits.argmax(-1)


def timed_generation(
    runner: Runner, prompt_len: int, new_tokens: int, rng: np.random.Generator
) -> dict:
    high = min(1000, runner.graph.vocab)
    prompt = rng.integers(3, high, (runner.batch, prompt_len), dtype=np.int64)
    t0 = time.perf_counter()
    tokens = runner.prefill(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens = runner.step(tokens)
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "decode_s": t2 - t1, "steps": new_tokens - 1}


def bench(model_path: Path, batch: int, args: argparse.Namespace) -> dict:
    runner = Runner(model_path, batch, args)
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
            save_model(
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
