"""The Redis protocol on its own (fakeredis): messages, the reply stream as the bot reads it,
queue limit, pins, heartbeats."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from bot.backends import RestartPiece
from bot.backends import protocol as p
from bot.backends.redis_backend import LOST_NOTE, RedisBackend, ensure_group
from bot.config import BotConfig
from bot.engine import PromptTooLongError, QueueFullError, SamplingParams
from bot.service import ChatService
from bot.storage.db import Database
from bot.turns import IncomingMessage, Speaker

SHORT = SamplingParams(max_new_tokens=8)


def test_request_round_trip_and_malformed_requests():
    params = SamplingParams(temperature=0.5, stop=("\nUser:",), stop_token_ids=(2, 3), seed=7)
    request = p.GenerationRequest("abc", [1, 2, 3], params, "tiny@1", 30.0, time.time())
    back = p.GenerationRequest.decode(request.encode())
    assert back == request and back.params.stop == ("\nUser:",)
    assert 29.0 < back.remaining_s() <= 30.0
    assert p.GenerationRequest("x", [1], params, "m@1", None, 0.0).remaining_s() is None
    for bad in ["not json", "{}", json.dumps({**json.loads(request.encode()), "prompt": "x"})]:
        with pytest.raises(ValueError, match="malformed generation request"):
            p.GenerationRequest.decode(bad)
    bad_params = json.loads(request.encode())
    bad_params["params"]["top_p"] = 3
    with pytest.raises(ValueError, match="top_p"):
        p.GenerationRequest.decode(json.dumps(bad_params))


@pytest.fixture
async def fake():
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def backend(fake, tiny_model):
    keys = p.Keys("t")
    await ensure_group(fake, keys)
    backend = RedisBackend(fake, tiny_model, prefix="t", max_queue=2)
    yield backend
    for stream in list(backend._streams):
        stream.cancel()


async def test_submit_enqueues_a_pinned_request_and_checks_it_first(backend, fake, tiny_model):
    stream = await backend.submit([1, 2, 3], SamplingParams(max_new_tokens=5), timeout_s=9)
    [(_, fields)] = await fake.xrange("t:requests")
    request = p.GenerationRequest.decode(fields["d"])
    assert request.id == stream.request.id and request.prompt == [1, 2, 3]
    assert request.model == "tiny@1" and request.timeout_s == 9
    assert await fake.exists(f"t:req:{request.id}")
    with pytest.raises(PromptTooLongError, match="at most"):
        await backend.submit([1] * tiny_model.max_context, SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="token ids must be in"):
        await backend.submit([10**9], SHORT)
    with pytest.raises(ValueError, match="non-empty"):
        await backend.submit([], SHORT)


async def test_queue_limit_counts_only_requests_no_worker_took(backend, fake):
    await backend.submit([1], SHORT)
    await backend.submit([2], SHORT)
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        await backend.submit([3], SHORT)
    assert await backend.waiting() == 2
    await fake.xreadgroup(p.GROUP, "w1", {"t:requests": ">"}, count=1)  # a worker takes one
    assert await backend.waiting() == 1
    await backend.submit([3], SHORT)


async def write(fake, request_id: str, *events: str) -> None:
    for data in events:
        await fake.xadd(f"t:reply:{request_id}", {"d": data})


async def test_the_stream_restarts_on_a_newer_attempt_and_ignores_older_ones(backend, fake):
    stream = await backend.submit([1, 2], SHORT)
    rid = stream.request.id
    end = p.result_to_dict(p.result_from_dict({"text": "Hi there", "finish_reason": "stop"}))
    await write(
        fake,
        rid,
        p.event("s", 1, w="a"),
        p.event("p", 1, x="Hel"),
        p.event("s", 2, w="b"),  # worker a died; b claimed the request and starts over
        p.event("p", 2, x="Hi"),
        p.event("p", 1, x="lo"),  # a late write of the old attempt: ignored
        p.event("p", 2, x=" there"),
        p.event("e", 2, r=end),
    )
    pieces = [piece async for piece in stream]
    assert pieces == ["Hel", "", "Hi", " there"] and isinstance(pieces[1], RestartPiece)
    assert not isinstance(pieces[2], RestartPiece)
    assert stream.result.text == "Hi there" and stream.restarts == 1
    assert not await fake.exists(f"t:reply:{rid}", f"t:req:{rid}")  # cleaned up


async def test_cancel_ends_the_stream_at_once_and_raises_the_flag(backend, fake):
    stream = await backend.submit([1, 2], SHORT)
    await write(fake, stream.request.id, p.event("s", 1, w="a"), p.event("p", 1, x="Hel"))
    assert await anext(aiter(stream)) == "Hel"
    stream.cancel()
    result = await stream.wait()
    assert result.finish_reason == "cancelled" and result.text == "Hel"
    assert [piece async for piece in stream] == []
    await backend.settle()
    assert await fake.get(f"t:cancel:{stream.request.id}") == "1"


async def test_a_request_redis_forgot_fails_with_a_clear_error(backend, fake):
    stream = await backend.submit([1, 2], SHORT)
    await fake.flushall()  # what a Redis restart without persistence looks like
    result = await stream.collect()
    assert result.finish_reason == "error" and result.error == LOST_NOTE


async def test_a_pin_set_by_one_shard_is_followed_by_the_others(fake, two_versions, tiny_model):
    await ensure_group(fake, p.Keys("t"))
    one = RedisBackend(fake, tiny_model, registry=two_versions.root, prefix="t")
    two = RedisBackend(fake, tiny_model, registry=two_versions.root, prefix="t")
    swapped = await one.swap("tiny@2")
    assert swapped.ref == "tiny@2" and await fake.get("t:model") == "tiny@2"
    assert (await two.refresh()).ref == "tiny@2" and two.model.ref == "tiny@2"
    stream = await two.submit([1, 2], SHORT)
    assert stream.request.model == "tiny@2"
    stream.cancel()


async def test_a_shard_builds_its_next_prompt_for_a_pin_another_shard_just_moved(
    fake, two_versions, tiny_model, tmp_path
):
    """Without waiting for any check: a prompt built for the old version would send the
    workers back to it (e2e: test_model_use_while_a_reply_streams_moves_both_shards_...)."""
    await ensure_group(fake, p.Keys("t"))
    one = RedisBackend(fake, tiny_model, registry=two_versions.root, prefix="t")
    two = RedisBackend(fake, tiny_model, registry=two_versions.root, prefix="t")
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    service = ChatService(db, two, BotConfig(_env_file=None, data_dir=tmp_path))
    try:
        await one.swap("tiny@2")
        msg = IncomingMessage(10, 5, Speaker(1, "alice"), "hello", message_id=11)
        async with service.reply(msg, bot=Speaker(900, "Bot", is_bot=True)) as reply:
            [(_, fields)] = await fake.xrange("t:requests")
            assert p.GenerationRequest.decode(fields["d"]).model == "tiny@2"
            reply.stop()
        assert two.model.ref == "tiny@2"
    finally:
        await two.close()
        await db.close()


async def test_stats_list_live_workers_and_drop_expired_ones(backend, fake):
    beat = {"model": "tiny@1", "provider": "cpu", "slots": 4, "busy": 1, "tokens_per_s": 12.5}
    await fake.set("t:worker:w1", json.dumps({"id": "w1", "time": time.time(), **beat}))
    await fake.sadd("t:workers", "w1", "w2")  # w2's heartbeat has expired
    await backend.submit([1], SHORT)
    stats = await backend.stats()
    assert [w.id for w in stats.workers] == ["w1"] and stats.workers[0].tokens_per_s == 12.5
    assert (stats.queued, stats.active, stats.slots, stats.model) == (1, 1, 4, "tiny@1")
    assert stats.provider == "cpu"
    assert await fake.smembers("t:workers") == {"w1"}


async def test_a_lost_pin_is_set_again_by_the_next_check(backend, fake):
    await fake.delete("t:model")  # Redis restarted empty
    assert (await backend.refresh()).ref == "tiny@1"
    assert await fake.get("t:model") == "tiny@1"


def test_a_worker_that_cannot_go_on_exits_non_zero_with_one_line(monkeypatch, capsys):
    import argparse

    from bot import worker as cli
    from bot.backends.worker import WorkerError
    from bot.config import get_settings

    async def failing(settings, worker_id, worker_cls=None):
        raise WorkerError("the read loop failed: UnicodeDecodeError: ...")

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("BOT_CONFIG", "")
    monkeypatch.setattr(cli, "serve", failing)
    get_settings.cache_clear()
    try:
        assert cli.main(argparse.Namespace(id="w1")) == 1
        assert cli.main(argparse.Namespace(id="bad id/../x")) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: worker w1 stopped: the read loop failed: UnicodeDecodeError: ..."
    assert err[1].startswith("error: invalid worker id 'bad id/../x'")
