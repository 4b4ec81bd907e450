"""Fixtures of the end-to-end tests: the local fake Discord and the real bot connected to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.backends import LocalBackend
from bot.client import create_bot
from bot.config import BotConfig
from tests.e2e.helpers import Start
from tests.engine.fakes import Runners
from tests.fakediscord import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    base, gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    async with FakeDiscord(n_channels=20) as server:
        yield server
    Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@pytest.fixture
def bot_config(fake: FakeDiscord, tiny_registry, tmp_path: Path) -> Callable[..., BotConfig]:
    """bot_config(**settings) -> the settings of a bot on the fake Discord and the tiny model."""

    def config(**overrides: Any) -> BotConfig:
        values: dict[str, Any] = dict(
            _env_file=None,
            discord_api_base=fake.api_base,
            discord_gateway_url=fake.gateway_url,
            data_dir=tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
            model_registry=tiny_registry.root,
            device="cpu",
            command_guild_ids=[fake.guild_id],
            edit_interval_s=0.0,
            placeholder_after_s=0.0,  # on in the tests of it only (timing-free elsewhere)
            user_rate_per_min=1000,
            channel_rate_per_min=1000,
            engine_slots=4,
        )
        return BotConfig(**{**values, **overrides})

    return config


@pytest.fixture
async def start_bot(
    fake: FakeDiscord, bot_config: Callable[..., BotConfig]
) -> AsyncIterator[Start]:
    """start_bot(**settings) -> a connected ChatBot on the tiny model; all are closed at the end.
    `runners=Runners(hook)` (tests/engine/fakes.py) wraps its engine's graph runners, so a test
    can hold the engine mid-reply (a Gate) instead of racing it."""
    running: list[tuple[Any, asyncio.Task]] = []

    async def start(runners: Runners | None = None, **overrides: Any) -> Any:
        settings = bot_config(**overrides)
        bot = await create_bot(settings)
        if runners is not None:
            options = settings.engine_options() | {"wrap_runner": runners}

            async def backend() -> LocalBackend:
                return await LocalBackend.start(settings.model, **options)

            bot._start_backend = backend
        task = asyncio.create_task(bot.start("fake-token"))
        ready = asyncio.create_task(bot.wait_until_ready())
        await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
        assert ready.done(), "the bot did not become ready"
        running.append((bot, task))
        return bot

    async def stop(bot: Any) -> None:
        for entry in list(running):
            if entry[0] is bot:
                running.remove(entry)
                await bot.close()
                await asyncio.wait_for(entry[1], 30)

    start.stop = stop  # type: ignore[attr-defined]
    yield start
    for bot, task in running:
        await bot.close()
        await asyncio.wait_for(task, 30)
    assert fake.pings == []  # whatever the scenario, no message the bot sent notified anyone
