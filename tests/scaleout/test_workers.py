"""Workers and RedisBackend against a real Redis: scripted engines decide when pieces come, so
every step (take, stream, cancel, claim, pin) is observed, not raced."""

from __future__ import annotations

import pytest

from bot.backends.protocol import GROUP, Keys
from bot.backends.redis_backend import RedisBackend
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
