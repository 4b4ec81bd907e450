"""Load figure of the scale-out layout: N concurrent conversations through Redis, 1 vs 2 workers.

Usage: python scripts/bench_scaleout.py [--model REF] [--registry DIR] [--workers 1 2]
           [--conversations 64] [--max-new-tokens 64] [--threads N] [--redis-url URL]
Starts its own redis-server on a free port unless --redis-url is given, then for each worker
count: that many `python -m bot worker` processes (ENGINE_THREADS: --threads, default the cores
divided among the workers), one warm-up request each, then every conversation at once (greedy,
ignore EOS) through RedisBackend. One JSON object: aggregate completion tokens/s and p50/p99
time to the first piece per worker count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.backends.redis_backend import RedisBackend, connect  # noqa: E402
from bot.config import load_settings  # noqa: E402
from bot.engine import SamplingParams  # noqa: E402
from bot.engine.bench import percentile  # noqa: E402

TOPICS = ["the sea", "mountains", "coffee", "trains", "music", "gardens", "rain", "books"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(url: str | None):
    if url:
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("error: redis-server is not installed; pass --redis-url")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        proc = subprocess.Popen(
            [*args, "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(30)


async def wait_for_workers(backend: RedisBackend, procs: list[subprocess.Popen], count: int):
    while len(await backend.workers()) < count:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("error: a worker exited while starting")
        await asyncio.sleep(0.2)


async def one_run(args: argparse.Namespace, url: str, workers: int) -> dict:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    env = {
        **os.environ,
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        "DEVICE": args.device,
        "ENGINE_SLOTS": str(args.slots),
        "ENGINE_THREADS": str(threads),
        "ENGINE_MAX_QUEUE": str(args.conversations),
    }
    if args.registry:
        env["MODEL_REGISTRY"] = str(args.registry)
    if args.model:
        env["MODEL"] = args.model
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bot", "worker", "--id", f"bench-{i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(workers)
    ]
    settings = load_settings(**({"model_registry": args.registry} if args.registry else {}))
    backend = await RedisBackend.connect(
        url,
        args.model or settings.model,
        registry=settings.model_registry,
        prefix=prefix,
        max_queue=args.conversations,
    )
    try:
        await wait_for_workers(backend, procs, workers)
        model = backend.model
        params = SamplingParams(greedy=True, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        warm = [await backend.submit(model.encode_chat("Hello!"), params) for _ in procs]
        await asyncio.gather(*(s.collect() for s in warm))

        async def conversation(i: int) -> tuple[float, int]:
            text = f"Tell me something about {TOPICS[i % len(TOPICS)]} (#{i})."
            start = time.perf_counter()
            stream = await backend.submit(model.encode_chat(text), params, timeout_s=600)
            first = None
            async for _ in stream:
                first = first or time.perf_counter()
            result = await stream.wait()
            if result.finish_reason != "length":
                raise SystemExit(f"error: a reply ended with {result.finish_reason}")
            return ((first or time.perf_counter()) - start) * 1000, result.completion_tokens

        start = time.perf_counter()
        done = await asyncio.gather(*(conversation(i) for i in range(args.conversations)))
        wall = time.perf_counter() - start
        ttfts = [t for t, _ in done]
        tokens = sum(n for _, n in done)
        return {
            "workers": workers,
            "threads_per_worker": threads,
            "slots_per_worker": args.slots,
            "tokens": tokens,
            "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(percentile(ttfts, 50), 1),
            "ttft_p99_ms": round(percentile(ttfts, 99), 1),
            "model": model.ref,
        }
    finally:
        await backend.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        client = connect(url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def main(args: argparse.Namespace) -> None:
    with redis_server(args.redis_url) as url:
        runs = [await one_run(args, url, n) for n in args.workers]
    report = {
        "conversations": args.conversations,
        "max_new_tokens": args.max_new_tokens,
        "device": args.device,
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="NAME, NAME@N or a version folder (default: active)")
    parser.add_argument("--registry", type=Path, help="registry folder (default: MODEL_REGISTRY)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32, help="KV slots per worker")
    parser.add_argument("--threads", type=int, default=0, help="0: the cores / workers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
