"""`python -m bot bench`: time to first token and tokens/s of the engine, median of repeats."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

from bot.engine.cli import add_model_arguments
from bot.engine.engine import Engine
from bot.engine.loader import LoadedModel
from bot.engine.types import EngineError, SamplingParams


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=1, help="requests submitted at once")
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="KV slots (streams decoded together; default: --concurrency); fewer than "
        "--concurrency makes the rest queue, as the bot's ENGINE_SLOTS does under load",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")


def _prompts(vocab: int, length: int, count: int, run: int) -> list[list[int]]:
    """Distinct fixed random prompts (the values do not change the speed), new ones for every
    run so that no run finds its prompts' KV kept from the one before."""
    rng = np.random.default_rng(run)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


async def _one_run(
    engine: Engine, prompts: list[list[int]], new_tokens: int
) -> tuple[dict[str, float], list[float]]:
    """The run's medians and every request's time to first token (ms, from submit: queueing
    behind other requests included)."""
    params = SamplingParams(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.submit(p, params).collect() for p in prompts))
    wall = time.perf_counter() - start
    bad = [r for r in results if r.completion_tokens != new_tokens]
    if bad:
        raise EngineError(f"a stream ended early: {bad[0].finish_reason} {bad[0].error or ''}")
    ttfts = [r.ttft_ms for r in results]
    return {
        "ttft_ms": statistics.median(ttfts),
        "decode_tok_s": statistics.median(r.tokens_per_s for r in results),
        "aggregate_tok_s": len(prompts) * new_tokens / wall,
        "wall_s": wall,
    }, ttfts


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil, at least the first
    return ordered[int(rank) - 1]


def _weights_bytes(model: LoadedModel) -> int:
    """The graph file and its external data file (the weights, as stored)."""
    files = (model.manifest.graph.file, model.manifest.graph.data_file)
    return sum((model.path / f).stat().st_size for f in files if (model.path / f).exists())


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    slots = args.slots or args.concurrency
    if min(args.prompt_tokens, args.new_tokens, args.concurrency, args.repeats, slots) < 1:
        raise ValueError(
            "--prompt-tokens, --new-tokens, --concurrency, --slots and --repeats must be >= 1"
        )
    engine = await Engine.start(
        args.model,
        registry=args.registry,
        device=args.device,
        slots=slots,
        max_queue=args.concurrency,
        threads=args.threads,
        spin=args.spin,
        prefill_chunk=args.prefill_chunk,
    )
    try:
        info = engine.session_info
        if args.device == "cuda" and info.provider != "cuda":  # no CPU figures for a GPU bench
            raise EngineError(f"CUDA was asked for but the CPU would run: {info.fallback_reason}")
        model = engine.model
        if args.prompt_tokens + args.new_tokens > model.max_context:
            raise ValueError(
                f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} "
                f"exceeds the model's max context {model.max_context}"
            )
        vocab = model.manifest.architecture.vocab_size
        runs, ttfts = [], []
        for i in range(args.warmup + args.repeats):
            prompts = _prompts(vocab, args.prompt_tokens, args.concurrency, i)
            if i < args.warmup:
                await _one_run(engine, prompts, min(args.new_tokens, 16))
                continue
            run, run_ttfts = await _one_run(engine, prompts, args.new_tokens)
            runs.append(run)
            ttfts += run_ttfts
            print(
                f"run {len(runs)}/{args.repeats}: ttft {run['ttft_ms']:.1f} ms "
                f"(max {max(run_ttfts):.0f}), "
                f"{run['decode_tok_s']:.1f} tok/s per stream, "
                f"{run['aggregate_tok_s']:.1f} tok/s aggregate",
                file=sys.stderr,
            )
        return {
            "model": model.ref,
            "provider": info.provider,
            "cuda_graphs": info.cuda_graphs,
            "threads": info.threads,
            "spin": args.spin,
            "precision": engine.precision,
            "concurrency": args.concurrency,
            "slots": slots,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            **{k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]},
            # every request of every timed run
            "ttft_p50_ms": round(percentile(ttfts, 50), 1),
            "ttft_p99_ms": round(percentile(ttfts, 99), 1),
            "ttft_max_ms": round(max(ttfts), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "weights_mb": round(_weights_bytes(model) / 2**20, 1),
            "kv_cache_mb": round(engine.kv_cache_bytes / 2**20, 1),
        }
    finally:
        await engine.close()


def bench_main(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_bench(args))
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['model']} {report['precision']} on {report['provider']}: "
            f"ttft {report['ttft_ms']} ms, {report['decode_tok_s']} tok/s per stream, "
            f"{report['aggregate_tok_s']} tok/s aggregate at concurrency {report['concurrency']} "
            f"(prompt {report['prompt_tokens']}, new {report['new_tokens']}, "
            f"{report['slots']} slots); time to first token of every request p50 "
            f"{report['ttft_p50_ms']} / p99 {report['ttft_p99_ms']} / max {report['ttft_max_ms']} "
            f"ms; peak RSS {report['peak_rss_mb']} MB (weights {report['weights_mb']} MB, "
            f"KV cache {report['kv_cache_mb']} MB)"
        )
    return 0
