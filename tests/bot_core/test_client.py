"""Unit tests of bot/client.py: the one-line errors users see, discord.py pointed at a server."""

from __future__ import annotations

from pathlib import Path

from discord import app_commands
from discord.http import HTTPClient, Route

from bot.client import create_bot, user_error
from bot.cogs.checks import NotAllowed
from bot.config import BotConfig
from bot.generation import SettingsError
from export.registry import RegistryError


def test_user_error_lines() -> None:
    assert user_error(NotAllowed("admins only")) == "admins only"
    wrapped = app_commands.CommandInvokeError.__new__(app_commands.CommandInvokeError)
    wrapped.original = SettingsError("temperature must be 0-2")
    assert user_error(wrapped) == "temperature must be 0-2"
    assert user_error(RegistryError("no model named 'x'")) == "no model named 'x'"
    assert user_error(KeyError("internal")) is None


async def test_create_bot_points_discord_py_at_the_configured_server(tmp_path: Path) -> None:
    saved, library_gateway = Route.BASE, HTTPClient.get_bot_gateway
    try:
        settings = BotConfig(
            data_dir=tmp_path,
            discord_api_base="http://127.0.0.1:5/api/v10/",
            discord_gateway_url="ws://127.0.0.1:5/gateway",
        )
        bot = await create_bot(settings)
        assert Route.BASE == "http://127.0.0.1:5/api/v10"
        shards, url, limits = await bot.http.get_bot_gateway()
        assert (shards, url, limits["max_concurrency"]) == (1, "ws://127.0.0.1:5/gateway", 1)
        assert HTTPClient.get_bot_gateway is library_gateway  # only our client is patched
        assert bot.intents.message_content and bot.intents.dm_messages
        assert bot.allowed_mentions is not None and bot.allowed_mentions.everyone is False
        await bot.close()
    finally:
        Route.BASE = saved
