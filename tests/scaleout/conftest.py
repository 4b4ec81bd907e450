"""Fixtures of the scale-out tests: a real Redis (BOT_TEST_REDIS_URL), a fresh key prefix per
test, a registry with two versions of the tiny llama, in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid

import pytest

REDIS_URL = os.environ.get("BOT_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(
    not REDIS_URL,
    reason="BOT_TEST_REDIS_URL not set (`make test` or scripts/test_services.sh starts a Redis)",
)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (a bot process or worker then shuts down in order), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def two_versions(tiny_checkpoints, tmp_path_factory):
    """A registry whose `tiny` has versions 1 and 2 (the same tiny llama), 1 active."""
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("scaleout-registry"))
    for _ in range(2):
        request = ExportRequest(tiny_checkpoints["llama"], "tiny", flavour="fused", progress=False)
        export_checkpoint(request, registry)
    registry.use("tiny@1")
    return registry


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own, so tests never see each other's requests."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(prefix):
    from bot.backends.redis_backend import connect

    client = connect(REDIS_URL)
    yield client
    with contextlib.suppress(Exception):
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    await client.aclose()


@contextlib.asynccontextmanager
async def running_worker(engine, prefix: str, worker_id: str, url: str | None = None, **options):
    """An InferenceWorker serving `engine` with its own Redis client, in this event loop."""
    from bot.backends.redis_backend import connect
    from bot.backends.worker import InferenceWorker

    client = connect(url or REDIS_URL)
    options = {"claim_idle_s": 2.0, "heartbeat_s": 0.2, "cancel_poll_s": 0.05} | options
    worker = InferenceWorker(client, engine, worker_id=worker_id, prefix=prefix, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await task
        await client.aclose()


@pytest.fixture(scope="session")
def tiny_model(two_versions):
    """tiny@1 as the bot side loads it (manifest, tokenizer; no ONNX session)."""
    from bot.engine import load_model

    return load_model("tiny@1", two_versions.root)


async def eventually(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `condition()` (sync or async) until true; fail after a generous bound."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
