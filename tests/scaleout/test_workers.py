"""Workers and RedisBackend against a real Redis: scripted engines decide when pieces come, so
every step (take, stream, cancel, claim, pin) is observed, not raced."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import pytest
import redis.asyncio as aioredis

from bot.backends.protocol import GROUP, GenerationRequest, Keys
from bot.backends.redis_backend import RedisBackend, RedisStream, connect
from bot.backends.worker import InferenceWorker, WorkerError
from bot.engine import SamplingParams
from tests.scaleout.conftest import REDIS_URL, eventually, needs_redis, running_worker
from tests.scaleout.scripted import ScriptedEngine

pytestmark = needs_redis
SHORT = SamplingParams(max_new_tokens=8)


@pytest.fixture
async def backend(redis_client, prefix, tiny_model, two_versions):
    backend = await RedisBackend.connect(
        REDIS_URL, "tiny@1", registry=two_versions.root, prefix=prefix, max_queue=8
    )
    yield backend
    await backend.close()


async def test_a_worker_streams_pieces_and_acks_the_request(backend, redis_client, prefix):
    engine = ScriptedEngine()
    async with running_worker(engine, prefix, "w1") as worker:
        stream = await backend.submit([5, 6, 7], SHORT, timeout_s=30)
        scripted = await engine.stream(0)
        assert scripted.prompt == [5, 6, 7] and scripted.params == SHORT
        scripted.feed("Hello", ",")
        reader, text = aiter(stream), ""
        while text != "Hello,":  # pieces that come together may travel in one message
            text += await anext(reader)
        scripted.feed(" world")
        scripted.end("stop")
        assert "".join([piece async for piece in stream]) == " world"
        result = await stream.wait()
        assert (result.text, result.finish_reason) == ("Hello, world", "stop")
        assert result.model == "tiny@1"
        keys = Keys(prefix)
        await eventually(lambda: not worker.jobs, what="the job to end")
        assert await redis_client.xlen(keys.requests) == 0  # acked and deleted
        assert (await redis_client.xpending(keys.requests, GROUP))["pending"] == 0
        assert not await redis_client.exists(keys.reply(stream.request.id))


async def test_a_cancel_reaches_the_worker_mid_reply(backend, redis_client, prefix):
    engine = ScriptedEngine()
    async with running_worker(engine, prefix, "w1") as worker:
        stream = await backend.submit([1, 2], SHORT)
        scripted = await engine.stream(0)
        scripted.feed("partial")
        assert await anext(aiter(stream)) == "partial"
        stream.cancel()
        assert (await stream.wait()).finish_reason == "cancelled"
        await eventually(lambda: scripted.cancelled, what="the worker to cancel its stream")
        await eventually(lambda: not worker.jobs, what="the job to end")
        assert await redis_client.xlen(Keys(prefix).requests) == 0


async def test_a_request_cancelled_while_queued_is_never_generated(backend, redis_client, prefix):
    stream = await backend.submit([1, 2], SHORT)
    stream.cancel()
    await backend.settle()
    engine = ScriptedEngine()
    async with running_worker(engine, prefix, "w1"):
        await eventually(
            lambda: _empty(redis_client, Keys(prefix).requests), what="the request to be dropped"
        )
    assert engine.streams == []


async def _empty(client, key: str) -> bool:
    return await client.xlen(key) == 0


async def test_workers_take_no_more_than_their_slots_and_share_the_rest(backend, prefix):
    one, two = ScriptedEngine(slots=2), ScriptedEngine(slots=2)
    async with running_worker(one, prefix, "w1"), running_worker(two, prefix, "w2"):
        streams = [await backend.submit([i + 1], SHORT) for i in range(5)]
        await eventually(lambda: len(one.streams) + len(two.streams) == 4, what="4 taken")
        assert len(one.streams) == 2 and len(two.streams) == 2
        assert await backend.waiting() == 1  # no free slot for the fifth
        stats = await backend.stats()
        assert {w.id for w in stats.workers} == {"w1", "w2"}
        assert (stats.slots, stats.queued) == (4, 1)
        for s in [*one.streams, *two.streams]:
            s.feed("ok")
            s.end()
        await eventually(lambda: len(one.streams) + len(two.streams) == 5, what="the fifth")
        [fifth] = [s for s in [*one.streams, *two.streams] if not s.done]
        fifth.feed("ok")
        fifth.end()
        results = [await s.collect() for s in streams]
        assert [r.text for r in results] == ["ok"] * 5


async def test_a_swap_on_one_shard_moves_every_worker(backend, prefix, two_versions):
    other = await RedisBackend.connect(REDIS_URL, registry=two_versions.root, prefix=prefix)
    one, two = ScriptedEngine(slots=1), ScriptedEngine(slots=1)
    try:
        assert other.model.ref == "tiny@1"  # the pin, not the registry's newest
        async with running_worker(one, prefix, "w1"), running_worker(two, prefix, "w2"):
            await backend.swap("tiny@2")
            await other.refresh()
            streams = [await b.submit([1], SHORT) for b in (backend, other)]
            for engine in (one, two):
                (await engine.stream(0)).end()
            assert [(await s.wait()).model for s in streams] == ["tiny@2", "tiny@2"]
            assert one.swaps == ["tiny@2"] and two.swaps == ["tiny@2"]
    finally:
        await other.close()


async def test_a_worker_that_cannot_load_the_pinned_version_ends_the_reply_with_an_error(
    backend, redis_client, prefix
):
    class Failing(ScriptedEngine):
        async def swap(self, ref):
            from bot.engine import ModelLoadError

            raise ModelLoadError(f"no version {ref}")

    await redis_client.set(Keys(prefix).model, "tiny@2")
    await backend.refresh()
    async with running_worker(Failing(), prefix, "w1"):
        result = await (await backend.submit([1], SHORT)).collect()
    assert result.finish_reason == "error" and "no version tiny@2" in result.error


async def test_a_malformed_request_is_dropped_and_the_worker_goes_on(backend, redis_client, prefix):
    keys = Keys(prefix)
    await redis_client.xadd(keys.requests, {"d": "garbage"})
    engine = ScriptedEngine()
    async with running_worker(engine, prefix, "w1"):
        stream = await backend.submit([1], SHORT)
        (await engine.stream(0)).end()
        assert (await stream.wait()).finish_reason == "stop"
        await eventually(lambda: _empty(redis_client, keys.requests), what="both acked")


async def _poison(client, keys: Keys, request: GenerationRequest, **changes) -> None:
    """Enqueue `request` with `changes` made to its JSON (json.dumps writes inf as Infinity)."""
    raw = json.loads(request.encode()) | changes
    await client.set(keys.marker(request.id), "1", ex=600)
    await client.xadd(keys.requests, {"d": json.dumps(raw)})


def _request() -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, [1, 2], SHORT, "tiny@1", 30.0, time.time())


async def test_poison_entries_are_refused_answered_and_acked_and_the_worker_goes_on(
    backend, redis_client, prefix, caplog
):
    """A token id of 2**70, an Infinity or NaN timeout, wrong types, bytes that are not UTF-8:
    each entry is acked (never claimed again), its sender gets an error at once, it is logged
    once, and the worker (its loops, its heartbeat) goes on serving."""
    keys = Keys(prefix)
    changes = {
        "huge token": {"prompt": [2**70]},
        "infinite timeout": {"timeout_s": float("inf")},
        "nan timeout": {"timeout_s": float("nan")},
        "prompt as text": {"prompt": "1,2"},
        "top_k as text": {"params": {"top_k": "3"}},
        "bool as int": {"params": {"max_new_tokens": True}},
        "path as model": {"model": "../../elsewhere@1"},
    }
    streams = {}
    for name, change in changes.items():
        request = _request()
        await _poison(redis_client, keys, request, **change)
        streams[name] = RedisStream(backend, request, None)
    raw = aioredis.from_url(REDIS_URL)  # bytes as they are, as any Redis client could write
    try:
        request = _request()
        data = request.encode().replace('"stop":[]', '"stop":["STOP"]').encode()
        await redis_client.set(keys.marker(request.id), "1", ex=600)
        await raw.xadd(keys.requests, {"d": data.replace(b"STOP", b"\xff\xfe")})
        streams["not UTF-8"] = RedisStream(backend, request, None)
        await raw.xadd(keys.requests, {"d": b"\xff\x00 no id at all"})
    finally:
        await raw.aclose()
    engine = ScriptedEngine()
    with caplog.at_level(logging.WARNING, logger="bot.backends.worker"):
        async with running_worker(engine, prefix, "w1"):
            for name, stream in streams.items():
                result = await asyncio.wait_for(stream.collect(), 60)
                assert result.finish_reason == "error", name
                assert result.error.startswith("bad request: malformed generation request"), name
            good = await backend.submit([3], SHORT)
            (await asyncio.wait_for(engine.stream(0), 60)).end()
            assert (await asyncio.wait_for(good.wait(), 60)).finish_reason == "stop"
            await eventually(lambda: _empty(redis_client, keys.requests), what="all acked")
            assert (await redis_client.xpending(keys.requests, GROUP))["pending"] == 0
            assert [w.id for w in await backend.workers()] == ["w1"]  # its heartbeat goes on
    assert len(engine.streams) == 1  # no poison reached the engine
    refused = [r for r in caplog.records if "refusing entry" in r.getMessage()]
    assert len(refused) == len(streams) + 1  # each logged once


async def test_a_loop_that_fails_stops_the_worker_with_one_line(prefix):
    """No exception ends a worker's loop silently: the worker stops in order and says why."""

    class Broken(InferenceWorker):
        async def _heartbeat(self) -> None:
            raise RuntimeError("boom\nsecond line")

    client = connect(REDIS_URL)
    try:
        worker = Broken(client, ScriptedEngine(), worker_id="w1", prefix=prefix, heartbeat_s=0.2)
        worker.claim_idle_s = 2.0
        with pytest.raises(WorkerError, match="the maintenance loop failed: RuntimeError: boom"):
            await asyncio.wait_for(worker.run(asyncio.Event()), 60)
    finally:
        await client.aclose()


async def test_malformed_heartbeats_are_skipped_and_stats_still_work(backend, prefix):
    keys = Keys(prefix)
    good = {"id": "w1", "model": "tiny@1", "provider": "cpu", "slots": 2, "busy": 0}
    good |= {"tokens_per_s": 1.5, "time": time.time()}
    beats = {
        "w1": json.dumps(good).encode(),
        "garbage": b"{not json",
        "infinite": json.dumps(good | {"id": "infinite", "tokens_per_s": float("inf")}).encode(),
        "text-slots": json.dumps(good | {"id": "text-slots", "slots": "2"}).encode(),
        "list": b"[1, 2]",
        "bytes": b'{"id": "\xff"}',
    }
    raw = aioredis.from_url(REDIS_URL)
    try:
        for worker_id, beat in beats.items():
            await raw.set(keys.worker(worker_id), beat, ex=600)
        await raw.sadd(keys.workers, *beats)
    finally:
        await raw.aclose()
    assert [w.id for w in await backend.workers()] == ["w1"]
    stats = await backend.stats()
    assert stats.slots == 2 and stats.provider == "cpu"


async def test_a_malformed_version_pin_is_never_loaded(backend, redis_client, prefix, tmp_path):
    """A pin is NAME@N; anything else (a path above all) is dropped and set again."""
    await redis_client.set(Keys(prefix).model, str(tmp_path / "elsewhere"))
    assert (await backend.refresh()).ref == "tiny@1"
    assert await redis_client.get(Keys(prefix).model) == "tiny@1"


async def test_a_request_the_worker_fails_on_is_answered_and_never_retried(
    backend, redis_client, prefix
):
    """An unexpected error while serving a request (here the engine's submit) ends that reply
    with an error and acks it: it used to stay pending and be claimed again, forever."""

    class Failing(ScriptedEngine):
        def submit(self, prompt, params, timeout_s=None):
            raise OverflowError("Python int too large to convert to C long")

    async with running_worker(Failing(), prefix, "w1") as worker:
        result = await asyncio.wait_for((await backend.submit([1], SHORT)).collect(), 60)
        assert result.finish_reason == "error"
        assert result.error.startswith("the worker failed on this request (OverflowError")
        await eventually(lambda: not worker.jobs, what="the job to end")
        keys = Keys(prefix)
        assert await redis_client.xlen(keys.requests) == 0
        assert (await redis_client.xpending(keys.requests, GROUP))["pending"] == 0
