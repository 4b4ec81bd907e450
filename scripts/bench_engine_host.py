"""The engine's own share of a decode step: the engine on a graph that costs nothing.

Usage: python scripts/bench_engine_host.py --model REF [--registry DIR] [--streams 1,8,64]

The version's tokenizer and settings are used, but its graph is replaced by a stand-in that
returns ready logits of `--vocab` entries at once, so what is timed is everything the engine does
around the graph: scheduling, sampling, detokenising, handing pieces to the event loop and the
loop taking them. Prints one JSON object per (sampling, streams) and a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.engine import Engine, SamplingParams
from bot.engine.loader import load_model
from bot.engine.scheduler import Worker
from bot.engine.session import SessionInfo

SAMPLING = {
    "greedy": SamplingParams(greedy=True),
    # the default model's card: temperature 0.2, top-p 0.9 (and the bot's top-k 50, penalty 1.1)
    "sampled": SamplingParams(temperature=0.2, top_p=0.9, top_k=50, repetition_penalty=1.1),
}


class InstantGraph:
    """What the scheduler needs of a runner; logits favour one token a row, below `real` (the
    tokenizer's vocabulary), so the pieces are real text."""

    def __init__(self, slots: int, vocab: int, real: int, max_context: int) -> None:
        self.slots, self.vocab, self.max_context = slots, vocab, max_context
        self.info = SessionInfo("cpu", 0)
        self.ids = np.zeros((slots, 1), np.int64)
        self.seqlens = np.zeros(slots, np.int32)
        rng = np.random.default_rng(0)
        self._logits = rng.standard_normal((8, slots, vocab)).astype(np.float32)
        favoured = rng.integers(3, real, (8, slots))
        for k in range(8):
            self._logits[k, np.arange(slots), favoured[k]] += 12.0
        self._step = 0

    def span(self, first: int, n: int) -> tuple[int, int]:
        return first, first + n

    def decode(self, first: int, n: int) -> np.ndarray:
        self._step += 1
        return self._logits[self._step % 8]

    def prefill(self, slot: int, tokens: np.ndarray, past: int) -> np.ndarray:
        return self._logits[0, slot]

    def release(self) -> None:
        pass


async def one(args, params: SamplingParams, streams: int) -> dict:
    model = load_model(args.model, args.registry)
    graph = InstantGraph(streams, args.vocab, model.manifest.architecture.vocab_size, 4096)
    engine = Engine(
        Worker(model, graph),
        registry=args.registry,
        device="cpu",
        slots=streams,
        max_queue=streams,
        threads=None,
        spin=False,
        prefill_chunk=256,
    )
    try:
        params = SamplingParams(**{**vars(params), "max_new_tokens": args.new_tokens})
        params = SamplingParams(**{**vars(params), "ignore_eos": True, "seed": 0})
        runs = []
        for run in range(args.repeats + 1):
            prompts = np.random.default_rng(run).integers(3, 200, (streams, 32)).tolist()
            graph._step = 0
            t0, c0 = time.perf_counter(), time.process_time()
            results = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert all(r.completion_tokens == args.new_tokens for r in results)
            if run:  # the first is a warm-up
                runs.append((wall / args.new_tokens * 1e3, cpu / args.new_tokens * 1e3))
        cpu_ms = statistics.median(c for _, c in runs)
        return {
            "streams": streams,
            "vocab": args.vocab,
            # CPU time of every thread of the process (the engine thread and the event loop):
            # what the host spends, steady on a shared machine where wall time is not
            "host_cpu_ms_per_step": round(cpu_ms, 3),
            "host_cpu_us_per_token": round(cpu_ms / streams * 1e3, 1),
            "wall_ms_per_step": round(statistics.median(w for w, _ in runs), 3),
        }
    finally:
        await engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a registry version (its tokenizer is used)")
    ap.add_argument("--registry", type=Path)
    ap.add_argument("--streams", default="1,8,64")
    ap.add_argument("--vocab", type=int, default=49152, help="logits per row (SmolLM2's)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    summary = {}
    for name, params in SAMPLING.items():
        for streams in map(int, args.streams.split(",")):
            record = {"sampling": name, **asyncio.run(one(args, params, streams))}
            print(json.dumps(record), flush=True)
            summary[f"{name}/{streams}"] = record["host_cpu_ms_per_step"]
    print(json.dumps({"host_cpu_ms_per_step": summary}))


if __name__ == "__main__":
    main()
