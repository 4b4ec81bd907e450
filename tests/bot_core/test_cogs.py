"""Unit tests of the cogs: when to answer, rate limits, streaming a reply, admin helpers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bot.cogs.admin import last_json_line, resolve_checkpoint
from bot.cogs.chat import IN_LINE, Chat
from bot.cogs.controls import APOLOGY
from bot.cogs.triggers import ChatLimits, RateLimiter, answer_reason, strip_mention
from bot.errors import BusyError
from export.registry import RegistryError

BASE = dict(from_bot=False, is_dm=False, mentioned=False, replying_to_bot=False, autoreply=False)


# ---- when to answer ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"mentioned": True}, "mention"),
        ({"replying_to_bot": True}, "reply"),
        ({"is_dm": True}, "dm"),
        ({"autoreply": True}, "autoreply"),
        ({"from_bot": True, "mentioned": True}, None),
        ({"from_bot": True, "is_dm": True, "autoreply": True}, None),
    ],
)
def test_answer_reason(changes: dict[str, bool], expected: str | None) -> None:
    assert answer_reason(**(BASE | changes), reply_in_dms=True) == expected


def test_dms_can_be_switched_off_but_mentions_in_dms_still_answer() -> None:
    assert answer_reason(**(BASE | {"is_dm": True}), reply_in_dms=False) is None
    dm_mention = BASE | {"is_dm": True, "mentioned": True}
    assert answer_reason(**dm_mention, reply_in_dms=False) == "mention"


def test_strip_mention_removes_both_forms_only_for_the_bot() -> None:
    assert strip_mention("<@42> hello there", 42) == "hello there"
    assert strip_mention("hi <@!42>, how are you?", 42) == "hi  , how are you?"
    assert strip_mention("<@43> hello", 42) == "<@43> hello"
    assert strip_mention("  <@42>  ", 42) == ""


# ---- rate limits ---------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_allows_limit_then_waits_for_the_oldest_event() -> None:
    clock = Clock()
    limiter = RateLimiter(2, 60.0, clock)
    for _ in range(2):
        assert limiter.retry_after(1) == 0
        limiter.record(1)
        clock.now += 10
    assert limiter.retry_after(1) == pytest.approx(40.0)  # first event at t=0, now t=20
    assert limiter.retry_after(2) == 0  # other keys are independent
    clock.now += 40
    assert limiter.retry_after(1) == 0  # the first event left the window
    limiter.record(1)
    assert limiter.retry_after(1) == pytest.approx(10.0)  # the second event (t=10) is oldest


def test_rate_limiter_rejects_nonsense_limits() -> None:
    for bad in ({"limit": -1}, {"limit": 1, "window_s": 0}, {"limit": 1, "max_keys": 0}):
        with pytest.raises(ValueError, match="limit"):
            RateLimiter(**bad)  # type: ignore[arg-type]


def test_rate_limit_zero_means_no_limit_and_tracks_nothing() -> None:
    limiter = RateLimiter(0, 60.0, Clock())
    for _ in range(1000):
        assert limiter.retry_after(1) == 0
        limiter.record(1)
    assert len(limiter) == 0
    limits = ChatLimits.per_minute(user_rate=0, channel_rate=0, clock=Clock())
    assert all(limits.check(user_id=1, channel_id=9) is None for _ in range(1000))


def test_one_off_keys_are_forgotten_once_idle_for_a_window() -> None:
    clock = Clock()
    limiter = RateLimiter(2, 60.0, clock)
    for key in range(5000):  # one message each from many users, over 50 seconds
        limiter.record(key)
        clock.now += 0.01
    assert len(limiter) == 5000
    clock.now += 30  # now 80 s after the first: those of the first 20 s are idle for a window
    limiter.record(99_999)
    assert 2998 <= len(limiter) <= 3001
    clock.now += 60
    assert limiter.retry_after(1) == 0 and len(limiter) == 0  # all idle: nothing kept


def test_rate_limiter_keeps_at_most_max_keys_forgetting_the_idlest() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 60.0, clock, max_keys=3)
    for key in (1, 2, 3):
        limiter.record(key)
        clock.now += 1
    limiter.record(1)  # not recorded over its limit by ChatLimits, but it makes 1 the newest
    limiter.record(4)  # a fourth key: 2, the idlest, is forgotten
    assert len(limiter) == 3
    assert limiter.retry_after(2) == 0
    assert all(limiter.retry_after(k) > 0 for k in (1, 3, 4))
    for key in range(10, 1000):
        limiter.record(key)
    assert len(limiter) == 3


def test_a_limited_key_keeps_only_limit_events() -> None:
    clock = Clock()
    limiter = RateLimiter(3, 60.0, clock)
    for _ in range(10_000):
        limiter.record(1)
    assert len(limiter._events[1]) == 3 and limiter.retry_after(1) == pytest.approx(60.0)


def test_chat_limits_user_then_channel_and_refusals_do_not_count() -> None:
    clock = Clock()
    limits = ChatLimits.per_minute(user_rate=2, channel_rate=3, clock=clock)
    assert limits.check(user_id=1, channel_id=9) is None
    assert limits.check(user_id=1, channel_id=9) is None
    refused = limits.check(user_id=1, channel_id=9)
    assert refused is not None and "60 s" in refused
    assert limits.check(user_id=2, channel_id=9) is None  # refusal above was not counted
    busy = limits.check(user_id=3, channel_id=9)
    assert busy is not None and "channel" in busy
    clock.now += 60
    assert limits.check(user_id=1, channel_id=9) is None


# ---- streaming a reply (fake Discord objects, fake ChatService) ----
_ids = itertools.count(100)


@dataclass
class FakeMessage:
    content: str
    channel: FakeChannel
    id: int = field(default_factory=lambda: next(_ids))
    edits: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    author: Any = None
    guild: Any = None

    deleted: bool = False

    async def edit(self, *, content: str, **_: Any) -> FakeMessage:
        self.content = content
        self.edits.append(content)
        return self

    async def delete(self) -> None:
        self.deleted = True

    async def reply(self, content: str, **_: Any) -> None:
        self.replies.append(content)


@dataclass
class FakeChannel:
    id: int = 9
    sent: list[FakeMessage] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    typing_entered: int = 0

    async def send(self, content: str, **kwargs: Any) -> FakeMessage:
        msg = FakeMessage(content, self)
        self.sent.append(msg)
        self.kwargs.append(kwargs)
        return msg

    @contextlib.asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        self.typing_entered += 1
        yield


class FakeReply:
    def __init__(
        self, pieces: list[str], error: Exception | None, gate: asyncio.Event | None = None
    ) -> None:
        self.pieces, self.error, self.gate = pieces, error, gate
        self.held: list[int] = []  # placeholders it was told of (Reply.hold)
        self.message_ids: list[int] = []
        self.ids_at_exit: list[int] | None = None
        self.result = SimpleNamespace(tokens_per_s=12.5)
        self.row_id = None  # nothing stored: no buttons
        self.stopped = self.history_cut = False
        self.stream = None  # the engine's stream (a thinking model's carries its thoughts)

    async def __aenter__(self) -> FakeReply:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ids_at_exit = list(self.message_ids)

    async def hold(self, message_id: int) -> None:  # as Reply.hold
        self.held.append(message_id)
        self.message_ids[:] = self.message_ids or [message_id]

    async def __aiter__(self) -> AsyncIterator[str]:
        if self.gate is not None:  # no text until the test opens it
            await self.gate.wait()
        for piece in self.pieces:
            yield piece
        if self.error is not None:
            raise self.error


class FakeService:
    def __init__(
        self, pieces: list[str], error: Exception | None = None, gate: asyncio.Event | None = None
    ) -> None:
        self.replies: list[FakeReply] = []
        self.incoming: list[Any] = []
        self.pieces, self.error, self.gate = pieces, error, gate

    def reply(self, msg: Any, *, bot: Any, pending_id: int | None = None) -> FakeReply:
        self.incoming.append(msg)
        self.replies.append(FakeReply(self.pieces, self.error, self.gate))
        return self.replies[-1]


class FakeBot:
    def __init__(self, service: FakeService, placeholder_after_s: float = 0.0) -> None:
        self.chat = service
        self.user = SimpleNamespace(id=42, display_name="bot")
        self.settings = SimpleNamespace(
            user_rate_per_min=5,
            channel_rate_per_min=5,
            edit_interval_s=0,
            redis_url="",
            placeholder_after_s=placeholder_after_s,
            show_thinking="hidden",
        )
        self.speeds: list[float] = []
        self.cogs: dict[str, Any] = {}  # as commands.Bot's: the Chat cog holds the rate limits

    def record_speed(self, tps: float) -> None:
        self.speeds.append(tps)

    def get_cog(self, name: str) -> Any:
        return self.cogs.get(name)


def _incoming() -> tuple[FakeChannel, FakeMessage]:
    channel = FakeChannel()
    author = SimpleNamespace(id=7, display_name="ann", bot=False)
    return channel, FakeMessage("<@42> hi", channel, author=author)


async def test_answer_streams_edits_and_records_message_ids() -> None:
    service = FakeService(["Hel", "lo ", "there"])
    bot = FakeBot(service)
    channel, message = _incoming()
    await Chat(bot).answer(message, "hi")  # type: ignore[arg-type]
    assert len(channel.sent) == 1 and channel.sent[0].content == "Hello there"
    assert channel.sent[0].edits[-1] == "Hello there"
    assert channel.kwargs[0]["reference"] is message  # replies to the user's message
    assert channel.kwargs[0]["allowed_mentions"].everyone is False
    assert service.replies[0].ids_at_exit == [channel.sent[0].id]
    assert service.incoming[0].content == "hi" and service.incoming[0].author.id == 7
    assert channel.typing_entered == 1 and bot.speeds == [12.5]


async def until(check: Any) -> None:
    """Let the event loop run until `check()` holds (a state, not a time)."""
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.001)


async def test_a_reply_that_waits_shows_a_placeholder_its_text_then_replaces() -> None:
    """16 members at once in 8 channels: half wait behind a whole reply. After
    PLACEHOLDER_AFTER_S without text the bot shows it has the message, in one message that the
    answer is then written into (one message in all, not a placeholder beside the answer); the
    inbox row learns its id, so that after a crash the answer replaces it too."""
    gate = asyncio.Event()
    service = FakeService(["Hel", "lo ", "there"], gate=gate)
    bot = FakeBot(service, placeholder_after_s=0.01)
    channel, message = _incoming()
    answering = asyncio.create_task(Chat(bot).answer(message, "hi"))  # type: ignore[arg-type]
    await until(lambda: service.replies and service.replies[0].held)
    [held] = channel.sent
    assert held.content == IN_LINE and channel.kwargs[0]["reference"] is message
    assert service.replies[0].held == [held.id] == service.replies[0].message_ids
    gate.set()
    await answering
    assert channel.sent == [held] and held.content == "Hello there" and not held.deleted
    assert service.replies[0].ids_at_exit == [held.id]


async def test_a_placeholder_no_text_replaced_is_deleted_and_the_note_said() -> None:
    gate = asyncio.Event()
    service = FakeService([], RuntimeError("boom"), gate=gate)
    channel, message = _incoming()
    answering = asyncio.create_task(
        Chat(FakeBot(service, placeholder_after_s=0.01)).answer(message, "hi")  # type: ignore[arg-type]
    )
    await until(lambda: channel.sent)
    gate.set()
    await answering
    assert channel.sent[0].content == IN_LINE and channel.sent[0].deleted
    assert message.replies == [APOLOGY]


async def test_no_placeholder_when_placeholder_after_s_is_zero() -> None:
    gate = asyncio.Event()
    service = FakeService(["fine"], gate=gate)
    channel, message = _incoming()
    answering = asyncio.create_task(Chat(FakeBot(service)).answer(message, "hi"))  # type: ignore[arg-type]
    await until(lambda: service.replies)
    for _ in range(50):  # the reply waits; nothing is posted meanwhile
        await asyncio.sleep(0)
    assert channel.sent == []
    gate.set()
    await answering
    assert [m.content for m in channel.sent] == ["fine"] and service.replies[0].held == []


async def test_reply_error_ends_the_streamed_text_with_its_friendly_line() -> None:
    bot = FakeBot(FakeService(["partial"], BusyError("queue full")))
    channel, message = _incoming()
    await Chat(bot).answer(message, "hi")  # type: ignore[arg-type]
    assert channel.sent[0].content.startswith("partial")
    assert BusyError.user_message in channel.sent[0].content


async def test_unexpected_error_before_any_text_is_a_short_apology() -> None:
    bot = FakeBot(FakeService([], RuntimeError("boom")))
    channel, message = _incoming()
    await Chat(bot).answer(message, "hi")  # type: ignore[arg-type]
    assert channel.sent == [] and message.replies == [APOLOGY]


# ---- admin helpers ----
def test_checkpoint_paths_must_stay_under_the_allowed_folder(tmp_path: Path) -> None:
    allowed = tmp_path / "checkpoints"
    (allowed / "small").mkdir(parents=True)
    assert resolve_checkpoint("small", allowed) == (allowed / "small").resolve()
    with pytest.raises(RegistryError, match="under"):
        resolve_checkpoint("../small", allowed)
    with pytest.raises(RegistryError, match="under"):
        resolve_checkpoint(str(tmp_path), allowed)
    with pytest.raises(RegistryError, match="no checkpoint"):
        resolve_checkpoint("missing", allowed)


def test_last_json_line_skips_progress_and_broken_lines() -> None:
    lines = ["exporting 10%", '{"name": "a", "version": 1}', "{broken", "done"]
    assert last_json_line(lines) == {"name": "a", "version": 1}
    assert last_json_line(["no json here"]) is None


async def test_a_channel_that_refuses_typing_still_gets_the_answer() -> None:
    class NoTyping(FakeChannel):
        def typing(self) -> Any:
            channel = self

            class Refused:
                async def __aenter__(self) -> None:
                    channel.typing_entered += 1
                    raise discord.Forbidden(SimpleNamespace(status=403, reason="no"), "refused")

            return Refused()

    bot = FakeBot(FakeService(["fine"]))
    channel = NoTyping()
    message = FakeMessage("hi", channel, author=SimpleNamespace(id=7, display_name="a", bot=False))
    await Chat(bot).answer(message, "hi")  # type: ignore[arg-type]
    assert channel.typing_entered == 1 and [m.content for m in channel.sent] == ["fine"]


async def test_chat_cog_loads_with_zero_rate_limits_and_never_refuses() -> None:
    """USER_RATE_PER_MIN=0 passed config validation, then the cog raised at load (issue 11)."""
    service = FakeService(["ok"])
    bot = FakeBot(service)
    bot.settings = SimpleNamespace(
        user_rate_per_min=0,
        channel_rate_per_min=0,
        edit_interval_s=0,
        reply_in_dms=True,
        redis_url="",
        placeholder_after_s=0.0,
        show_thinking="hidden",
    )
    bot.accepting = True  # type: ignore[attr-defined]
    bot.in_flight = contextlib.nullcontext  # type: ignore[attr-defined]
    cog = bot.cogs["Chat"] = Chat(bot)  # type: ignore[arg-type]
    channel, message = _incoming()
    message.mentions = [bot.user]  # type: ignore[attr-defined]
    for _ in range(30):
        await cog.on_message(message)  # type: ignore[arg-type]
    assert len(service.incoming) == len(channel.sent) == 30
    assert message.replies == []  # no "slow down" notes


async def test_reply_notes_threads_and_closed_threads() -> None:
    from bot.cogs.chat import thread_name
    from bot.cogs.controls import closed_thread, done_view, footer, stop_view

    assert footer([]) == "" and footer(["a", "b"]) == "\n\n*a*\n*b*"
    assert thread_name("  how do\nthreads   work?") == "how do threads work?"
    assert len(thread_name("x" * 300)) == 80
    assert not closed_thread(SimpleNamespace(archived=True))  # not a discord.Thread
    views = (stop_view(7), done_view(7, True))
    ids = [[item.custom_id for item in view.children] for view in views]  # type: ignore[attr-defined]
    assert ids == [["reply:stop:7"], ["reply:regen:7", "reply:cont:7"]]
    assert [i.custom_id for i in done_view(7, False).children] == ["reply:regen:7"]  # type: ignore[attr-defined]
    assert stop_view(7).timeout is None  # persistent
