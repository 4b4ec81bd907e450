"""Helpers of the end-to-end tests: waiting for the bot's replies and reading what it did."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy.ext.asyncio import AsyncSession

from bot.storage import repo
from tests.engine.fakes import Gate
from tests.fakediscord import FakeDiscord, Recorded

Start = Callable[..., Awaitable[Any]]  # the start_bot fixture: start_bot(**settings) -> ChatBot


async def reply_done(fake: FakeDiscord, bot: Any, channel_id: int, n_before: int = 0) -> None:
    """Wait until the bot has posted to the channel and has no reply in flight."""
    await fake.wait_until(
        lambda: len(fake.find("POST", f"/channels/{channel_id}/messages")) > n_before, 60
    )
    await fake.wait_until(lambda: bot.active_replies == 0, 60)


async def eventually(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Wait until `check()` (awaited when it is a coroutine) is truthy: state the fake cannot
    see, such as the database; `timeout` is a safety net only."""

    async def poll() -> Any:
        while True:
            result = check()
            result = (await result) if inspect.isawaitable(result) else result
            if result:
                return result
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


async def stop_while_held(start: Start, bot: Any, gate: Gate) -> None:
    """Shut `bot` down while `gate` holds its engine mid-reply: the gate opens once the shutdown
    has begun (the engine is closing), so the held reply is cut, never finished first."""
    stopping = asyncio.create_task(start.stop(bot))  # type: ignore[attr-defined]
    await eventually(lambda: bot.backend.closed or stopping.done())
    gate.open()
    await stopping


def same_text(shown: str, stored: str) -> bool:
    """Discord shows the stored text of one reply, maybe followed by a note such as the
    history-cut one (the tiny model's random output may hold NUL, which PostgreSQL stores as
    U+FFFD and SQLite keeps; leading and trailing blanks aside)."""
    shown, stored = (t.replace("\x00", "\ufffd").strip() for t in (shown, stored))
    return bool(stored) and shown.startswith(stored)


def pings_nobody(allowed: dict[str, Any]) -> bool:
    """Discord's allowed_mentions that ping no one: nothing parsed, no ids, no reply ping."""
    nobody = allowed.get("parse") == [] and not allowed.get("users") and not allowed.get("roles")
    return nobody and not allowed.get("replied_user", False)


async def command(
    fake: FakeDiscord, channel: int, user: dict, name: str, options: list | None = None
) -> tuple[dict[str, Any], Recorded]:
    """Run a slash command; (the interaction, the bot's callback to it)."""
    interaction = await fake.dispatch_interaction(channel, user, name, options)
    callback = await fake.wait_for(
        lambda r: r.path.startswith(f"/interactions/{interaction['id']}/")
    )
    return interaction, callback


async def stored(bot: Any, channel_id: int) -> list[Any]:
    async with bot.db.session() as s:
        return await repo.history(s, channel_id, 100)


def option(name: str, value: Any, kind: int) -> dict[str, Any]:
    return {"type": kind, "name": name, "value": value}


async def leave_in_inbox(
    s: AsyncSession,
    author: dict[str, Any],
    message: dict[str, Any],
    *,
    age: timedelta = timedelta(0),
    held_id: int | None = None,
) -> None:
    """What a kill -9 leaves of a message the bot accepted and never answered: its inbox row,
    received `age` ago, with the placeholder `held_id` the bot had shown for it."""
    pending = await repo.add_pending(
        s,
        channel_id=int(message["channel_id"]),
        author_id=int(author["id"]),
        author_name=author["username"],
        content=message["content"],
        discord_message_id=int(message["id"]),
    )
    pending.received_at = datetime.now(UTC) - age
    if held_id is not None:
        await s.flush()
        assert await repo.hold_pending(s, pending.id, held_id)


async def post_as_bot(
    fake: FakeDiscord, reply_to: dict[str, Any], content: str, *, with_channel: bool = True
) -> dict[str, Any]:
    """A reply to `reply_to` posted through the REST API as the bot posts its own (pinging no
    one); `with_channel=False` leaves the channel out of its reference (discord.py then cannot
    read the message back)."""
    channel = reply_to["channel_id"]
    reference = {"message_id": reply_to["id"]} | ({"channel_id": channel} if with_channel else {})
    body = {"content": content, "message_reference": reference}
    body["allowed_mentions"] = {"parse": [], "replied_user": False}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake.api_base}/channels/{channel}/messages", json=body) as response,
    ):
        return await response.json()
