"""Real processes, real Redis, the tiny model: the local and the Redis backend agree, a worker
killed with kill -9 mid-reply still ends in one complete reply, a Redis restart fails the
requests in flight with a clear error and the next ones work."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.backends import LocalBackend, RestartPiece
from bot.backends.protocol import Keys
from bot.backends.redis_backend import RedisBackend, connect
from bot.engine import Engine, SamplingParams
from tests.scaleout.conftest import (
    REDIS_URL,
    eventually,
    needs_redis,
    running_worker,
    stop_process,
)
from tests.scaleout.scripted import ScriptedEngine

pytestmark = needs_redis
ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(greedy=True, max_new_tokens=24, ignore_eos=True)


async def tiny_engine(registry, slots: int = 4) -> Engine:
    return await Engine.start(registry=registry.root, device="cpu", slots=slots, threads=1)


async def test_tiny_model_through_two_workers_matches_the_local_engine(prefix, two_versions):
    prompts = [[1 + i, 20 + i, 40 + i, 7] for i in range(6)]
    local = LocalBackend(await tiny_engine(two_versions))
    try:
        expected = [(await (await local.submit(p, GREEDY)).collect()).text for p in prompts]
    finally:
        await local.close()
    one, two = await tiny_engine(two_versions, 2), await tiny_engine(two_versions, 2)
    backend = await RedisBackend.connect(REDIS_URL, registry=two_versions.root, prefix=prefix)
    try:
        async with running_worker(one, prefix, "w1"), running_worker(two, prefix, "w2"):
            streams = [await backend.submit(p, GREEDY, timeout_s=60) for p in prompts]
            results = await asyncio.gather(*(s.collect() for s in streams))
            stats = await backend.stats()
    finally:
        await backend.close()
        await one.close()
        await two.close()
    assert [r.text for r in results] == expected
    assert all(r.finish_reason == "length" and r.completion_tokens == 24 for r in results)
    assert {w.id for w in stats.workers} == {"w1", "w2"} and stats.model == "tiny@1"


def worker_env(registry, prefix: str, url: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        "MODEL_REGISTRY": str(registry.root),
        "DEVICE": "cpu",
        "ENGINE_SLOTS": "2",
        "ENGINE_THREADS": "1",
        "WORKER_CLAIM_IDLE_S": "2",
        "WORKER_HEARTBEAT_S": "0.3",
        "DISCORD_TOKEN": "",
        "BOT_CONFIG": "",
    }


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path):
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc)


async def live_worker(backend: RedisBackend, worker_id: str, proc, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"worker {worker_id} exited:\n{log.read_text()[-3000:]}")
    return worker_id in {w.id for w in await backend.workers()}


async def test_a_worker_killed_mid_reply_still_ends_in_one_complete_reply(
    prefix, two_versions, tmp_path
):
    prompt = [3, 14, 15, 92, 65]
    engine = await tiny_engine(two_versions)
    try:
        expected = (await engine.generate(prompt, GREEDY)).text
    finally:
        await engine.close()
    env = worker_env(two_versions, prefix, REDIS_URL)
    backend = await RedisBackend.connect(REDIS_URL, registry=two_versions.root, prefix=prefix)
    stalling = [sys.executable, "-m", "tests.scaleout.stalling_worker", "stalls"]
    healthy = [sys.executable, "-m", "bot", "worker", "--id", "healthy"]
    try:
        with process(stalling, env, tmp_path / "stalls.log") as doomed:
            await eventually(
                lambda: live_worker(backend, "stalls", doomed, tmp_path / "stalls.log"),
                timeout_s=120,
                what="the first worker",
            )
            stream = await backend.submit(prompt, GREEDY, timeout_s=120)
            pieces = [await anext(aiter(stream))]  # the first piece, then it hangs
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            with process(healthy, env, tmp_path / "healthy.log"):
                pieces += [piece async for piece in stream]
                result = await stream.wait()

                async def only_the_healthy_one_left() -> bool:  # the dead one's beat expires
                    return [w.id for w in (await backend.stats()).workers] == ["healthy"]

                await eventually(only_the_healthy_one_left, what="the dead worker to drop out")
        restarts = [i for i, piece in enumerate(pieces) if isinstance(piece, RestartPiece)]
        assert restarts == [1] and stream.restarts == 1
        assert "".join(pieces[1:]) == result.text == expected
        assert result.finish_reason == "length" and result.completion_tokens == 24
        client = backend.client
        assert await client.xlen(Keys(prefix).requests) == 0
    finally:
        await backend.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(port: int, workdir: Path):
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed (scripts/test_services.sh needs it too)"
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


async def pong(url: str) -> bool:
    client = connect(url)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def test_a_redis_restart_fails_replies_in_flight_and_new_ones_work(
    prefix, two_versions, tmp_path
):
    port = free_port()  # a Redis of this test's own, to restart
    url = f"redis://127.0.0.1:{port}/0"
    engine = ScriptedEngine()
    with redis_server(port, tmp_path) as server:
        await eventually(lambda: pong(url), what="redis to start")
        backend = await RedisBackend.connect(url, registry=two_versions.root, prefix=prefix)
        async with running_worker(engine, prefix, "w1", url=url) as worker:
            stream = await backend.submit([1, 2], SamplingParams(max_new_tokens=8))
            (await engine.stream(0)).feed("half a rep")
            assert await anext(aiter(stream)) == "half a rep"
            server.terminate()
            server.wait(30)
            result = await stream.collect()
            assert result.finish_reason == "error" and "Redis" in result.error
            assert result.text == "half a rep"
            with redis_server(port, tmp_path):
                await eventually(lambda: pong(url), what="redis to restart")
                await eventually(lambda: not worker.jobs, what="the lost job to be dropped")
                stream = await backend.submit([3, 4], SamplingParams(max_new_tokens=8))
                after = await engine.stream(1)
                after.feed("fine")
                after.end()
                result = await stream.collect()
                assert (result.text, result.finish_reason) == ("fine", "stop")
                await backend.close()


def _read_until(proc: subprocess.Popen, needle: str, timeout_s: float = 120.0) -> str:
    """The process's output up to the line holding `needle` (select on its pipe, bounded)."""
    import selectors

    out, deadline = "", time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while needle not in out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} in the output:\n{out[-3000:]}")
            if selector.select(left):
                line = proc.stdout.readline()
                if not line:  # the process ended
                    raise AssertionError(f"no {needle!r} in the output:\n{out[-3000:]}")
                out += line.decode(errors="replace")
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_that_cannot_reach_redis_says_so_and_stops_on_a_signal(prefix, two_versions, sig):
    """It names what it cannot reach while it retries, and a signal stops it at once (it used
    to retry forever: only SIGKILL ended it)."""
    port = free_port()  # nothing listens there
    env = worker_env(two_versions, prefix, f"redis://:secret@127.0.0.1:{port}/3")
    args = [sys.executable, "-m", "bot", "worker", "--id", "lonely"]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out = _read_until(proc, f"cannot reach Redis at 127.0.0.1:{port}/3")
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)  # bounded: a worker that ignores it fails here
    finally:
        stop_process(proc)
    out += rest.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert f"stopped before Redis at 127.0.0.1:{port}/3 answered" in out
    assert "secret" not in out
