"""Rate limits in Redis hold across processes: two clients (two shards) share one budget."""

from __future__ import annotations

import pytest

from bot.backends.redis_backend import connect
from bot.redis_limits import RedisChatLimits, RedisRateLimiter
from tests.scaleout.conftest import REDIS_URL, needs_redis

pytestmark = needs_redis


@pytest.fixture
async def second_client():
    client = connect(REDIS_URL)  # another process's connection
    yield client
    await client.aclose()


async def test_two_shards_share_the_user_and_channel_budgets(redis_client, second_client, prefix):
    one = RedisChatLimits.per_minute(redis_client, user_rate=2, channel_rate=3, prefix=prefix)
    two = RedisChatLimits.per_minute(second_client, user_rate=2, channel_rate=3, prefix=prefix)
    assert await one.check(1, 100) is None
    assert await two.check(1, 100) is None
    note = await two.check(1, 101)  # the user's third message, on the other shard
    assert note is not None and note.startswith("You're sending messages quickly; try again in")
    assert await one.check(2, 100) is None  # a refused message counted for neither
    note = await one.check(3, 100)
    assert note is not None and note.startswith("This channel is busy; try again in")
    assert 55 <= await one.user.retry_after(1) <= 60
    assert await one.user.retry_after(9) == 0


async def test_a_short_window_frees_the_key_and_zero_means_no_limit(redis_client, prefix):
    limiter = RedisRateLimiter(redis_client, "cooldown", 1, window_s=0.05, prefix=prefix)
    await limiter.record(7)
    assert 0 < await limiter.retry_after(7) <= 0.05
    while await limiter.retry_after(7) > 0:  # the window passes on the server's clock
        pass
    assert await limiter.retry_after(7) == 0
    unlimited = RedisRateLimiter(redis_client, "none", 0, prefix=prefix)
    for _ in range(5):
        await unlimited.record(1)
    assert await unlimited.retry_after(1) == 0
    with pytest.raises(ValueError, match="limit >= 0"):
        RedisRateLimiter(redis_client, "bad", -1)
