"""Helpers of the end-to-end tests: waiting for the bot's replies and reading what it did."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bot.storage import repo
from tests.fakediscord import FakeDiscord, Recorded

Start = Callable[..., Awaitable[Any]]  # the start_bot fixture: start_bot(**settings) -> ChatBot


async def reply_done(fake: FakeDiscord, bot: Any, channel_id: int, n_before: int = 0) -> None:
    """Wait until the bot has posted to the channel and has no reply in flight."""
    await fake.wait_until(
        lambda: len(fake.find("POST", f"/channels/{channel_id}/messages")) > n_before, 60
    )
    await fake.wait_until(lambda: bot.active_replies == 0, 60)


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
