"""Rate limits kept in Redis (REDIS_URL), so they hold across bot processes (shards).

The same interface as the in-memory limits of bot.cogs.triggers, but async: a sliding window per
key in a sorted set, timed by the Redis server's clock (shards need not agree on the time).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# KEYS: one sorted set per limit. ARGV: window ms, member, then one limit per key (0: no limit).
# Checks every key; if all allow, records the event in every one. Returns {index of the first
# refusing key (0: none), ms until it allows}.
CHECK_AND_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local limit = tonumber(ARGV[i + 2])
  if limit > 0 and redis.call('ZCARD', KEYS[i]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    return {i, tonumber(oldest[2]) + window - now}
  end
end
if ARGV[2] ~= '' then
  for i = 1, #KEYS do
    redis.call('ZADD', KEYS[i], now, ARGV[2])
    redis.call('PEXPIRE', KEYS[i], window)
  end
end
return {0, 0}
"""


class RedisRateLimiter:
    """At most `limit` events per key in any `window_s` seconds, counted in Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        limit: int,
        window_s: float = 60.0,
        prefix: str = "bot",
    ) -> None:
        if limit < 0 or window_s <= 0:
            raise ValueError("a rate limit needs limit >= 0 (0: none) and window_s > 0")
        self.client, self.limit, self.window_s = client, limit, window_s
        self._base = f"{prefix}:rate:{name}"

    def key(self, key: int) -> str:
        return f"{self._base}:{key}"

    async def retry_after(self, key: int) -> float:
        """Seconds until `key` may act again (0 when it may act now); records nothing."""
        return (await _check(self.client, self.window_s, [(self.key(key), self.limit)], False))[1]

    async def record(self, key: int) -> None:
        """Count one event for `key` now (even past the limit)."""
        await _check(self.client, self.window_s, [(self.key(key), 0)], True)


async def _check(
    client: aioredis.Redis, window_s: float, limits: list[tuple[str, int]], record: bool
) -> tuple[int, float]:
    """(index of the first refusing limit, 1-based, or 0; seconds until it allows)."""
    member = uuid.uuid4().hex if record else ""
    args = [key for key, _ in limits] + [int(window_s * 1000), member]
    index, wait_ms = await client.eval(
        CHECK_AND_RECORD, len(limits), *args, *(limit for _, limit in limits)
    )
    return int(index), max(0.0, float(wait_ms) / 1000.0)


class RedisChatLimits:
    """Per-user and per-channel limits checked together across processes: a refused message
    counts for neither (bot.cogs.triggers.ChatLimits, async)."""

    def __init__(self, user: RedisRateLimiter, channel: RedisRateLimiter) -> None:
        if user.window_s != channel.window_s:
            raise ValueError("both limits must share one window")
        self.user, self.channel = user, channel

    @classmethod
    def per_minute(
        cls, client: aioredis.Redis, user_rate: int, channel_rate: int, prefix: str = "bot"
    ) -> RedisChatLimits:
        return cls(
            RedisRateLimiter(client, "user", user_rate, 60.0, prefix),
            RedisRateLimiter(client, "channel", channel_rate, 60.0, prefix),
        )

    async def check(self, user_id: int, channel_id: int) -> str | None:
        """None and both counted when allowed, else a short friendly note saying when to retry."""
        limits = [
            (self.user.key(user_id), self.user.limit),
            (self.channel.key(channel_id), self.channel.limit),
        ]
        index, wait = await _check(self.user.client, self.user.window_s, limits, True)
        if index == 1:
            return f"You're sending messages quickly; try again in {max(1, round(wait))} s."
        if index == 2:
            return f"This channel is busy; try again in {max(1, round(wait))} s."
        return None
