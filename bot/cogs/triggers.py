"""Pure decisions of the chat cog: when to answer, mention stripping, sliding-window rate limits."""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field


def answer_reason(
    *,
    from_bot: bool,
    is_dm: bool,
    mentioned: bool,
    replying_to_bot: bool,
    autoreply: bool,
    reply_in_dms: bool,
) -> str | None:
    """Why the bot should answer a message ("mention", "reply", "dm", "autoreply"), else None.

    `from_bot`: a message from the bot itself, or from another bot unless REPLY_TO_BOTS; such
    messages are never answered, so bots cannot loop.
    """
    if from_bot:
        return None
    if mentioned:
        return "mention"
    if replying_to_bot:
        return "reply"
    if is_dm:
        return "dm" if reply_in_dms else None
    if autoreply:
        return "autoreply"
    return None


def strip_mention(content: str, bot_id: int) -> str:
    """The message text without the bot's mentions (`<@id>` and `<@!id>`), whitespace trimmed."""
    return re.sub(rf"<@!?{bot_id}>", " ", content).strip()


MAX_KEYS = 10_000  # keys a RateLimiter tracks at most; beyond, the longest idle is forgotten


@dataclass
class RateLimiter:
    """At most `limit` events per key in any `window_s` seconds (a sliding window); limit 0: no
    limit. Memory stays bounded: a key idle for a whole window is forgotten (it could not be
    refused anyway), and past `max_keys` keys the one idle longest is forgotten."""

    limit: int
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    max_keys: int = MAX_KEYS
    _events: OrderedDict[int, deque[float]] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        if self.limit < 0 or not self.window_s > 0 or self.max_keys < 1:
            raise ValueError("a rate limit needs limit >= 0, window_s > 0 and max_keys >= 1")

    def __len__(self) -> int:
        """Keys tracked now."""
        return len(self._events)

    def _expire(self, now: float) -> None:
        """Forget keys whose newest event left the window (idlest first; amortised O(1))."""
        while self._events:
            key, events = next(iter(self._events.items()))
            if now - events[-1] < self.window_s:
                return
            del self._events[key]

    def retry_after(self, key: int) -> float:
        """Seconds until `key` may act again (0 when it may act now); records nothing."""
        if not self.limit:
            return 0.0
        now = self.clock()
        self._expire(now)
        events = self._events.get(key)
        if not events:
            return 0.0
        while now - events[0] >= self.window_s:
            events.popleft()  # never empties: the newest event is within the window
        return 0.0 if len(events) < self.limit else self.window_s - (now - events[0])

    def record(self, key: int) -> None:
        """Count one event for `key` now."""
        if not self.limit:
            return
        now = self.clock()
        self._expire(now)
        events = self._events.setdefault(key, deque(maxlen=self.limit))
        events.append(now)
        self._events.move_to_end(key)  # ordered by newest event, idlest first
        while len(self._events) > self.max_keys:
            self._events.popitem(last=False)


@dataclass
class ChatLimits:
    """Per-user and per-channel limits checked together: a refused message counts for neither."""

    user: RateLimiter
    channel: RateLimiter

    @classmethod
    def per_minute(
        cls, user_rate: int, channel_rate: int, clock: Callable[[], float] = time.monotonic
    ) -> ChatLimits:
        return cls(RateLimiter(user_rate, 60.0, clock), RateLimiter(channel_rate, 60.0, clock))

    def check(self, user_id: int, channel_id: int) -> str | None:
        """None and both counted when allowed, else a short friendly note saying when to retry."""
        wait = self.user.retry_after(user_id)
        if wait > 0:
            return f"You're sending messages quickly; try again in {max(1, round(wait))} s."
        wait = self.channel.retry_after(channel_id)
        if wait > 0:
            return f"This channel is busy; try again in {max(1, round(wait))} s."
        self.user.record(user_id)
        self.channel.record(channel_id)
        return None
