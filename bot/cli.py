"""`python -m bot start|run`: resolve the model version once, then Discord (or the console)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import aiohttp
import discord

from bot import console
from bot.config import BotConfig, ConfigError, get_settings, load_settings
from bot.logs import add_log_level_argument, configure_logging
from bot.storage.db import DatabaseError

PERMISSIONS = 309237713920  # View Channels, Send Messages, Create Public Threads, Send in Threads,
# Read Message History
NO_TOKEN_HELP = f"""\
No Discord token configured. To run the bot on Discord:
  1. Create an application at https://discord.com/developers/applications and add a Bot.
  2. On the Bot page, enable the "Message Content Intent" and copy the token.
  3. Set it: export DISCORD_TOKEN=... (or put DISCORD_TOKEN=... in .env).
  4. Invite the bot with the scopes `bot applications.commands`:
     https://discord.com/oauth2/authorize?client_id=APP_ID&scope=bot+applications.commands&permissions={PERMISSIONS}
Without a token, `python -m bot chat` chats in this terminal."""


async def serve(settings: BotConfig, token: str, model: Path) -> None:
    """Run the bot on `model` until closed; SIGTERM and SIGINT close it gracefully."""
    from bot.client import create_bot

    bot = await create_bot(settings, model=model)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    async with bot:
        await bot.prepare()  # database and engine first: their errors need no Discord
        await bot.start(token)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`run` takes its configuration from the environment, .env or BOT_CONFIG, and the
    console's setting options over them (`start` passes them on to either)."""
    console.add_settings_arguments(parser)
    add_log_level_argument(parser)


def run_main(args: argparse.Namespace) -> int:
    """Connect to Discord; without a token print how to get one and exit 2."""
    overrides = console.setting_overrides(args)
    settings = load_settings(**overrides) if overrides else get_settings()
    if settings.discord_token is None or not settings.discord_token.get_secret_value():
        print(NO_TOKEN_HELP, file=sys.stderr)
        return 2
    from bot.engine import EngineError, ModelLoadError
    from bot.engine.loader import resolve_version

    try:  # no usable model version: say so before connecting to Discord
        model = resolve_version(settings.model, settings.model_registry)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = settings.discord_token.get_secret_value()
    level = getattr(args, "log_level", None) or settings.log_level
    configure_logging(level, settings.log_format, secrets=settings.secrets())
    try:
        asyncio.run(serve(settings, token, model))
    except (ConfigError, EngineError, DatabaseError) as exc:  # EngineError: also Redis down
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except discord.LoginFailure:
        print(
            "error: Discord refused the token (DISCORD_TOKEN); copy it again from the "
            "developer portal",
            file=sys.stderr,
        )
        return 2
    except (OSError, aiohttp.ClientError) as exc:
        print(f"error: cannot reach Discord at {settings.discord_api_base}: {exc}", file=sys.stderr)
        return 1
    except discord.PrivilegedIntentsRequired:
        print(
            "error: enable the Message Content Intent on the bot's page in the developer portal",
            file=sys.stderr,
        )
        return 2
    return 0


def add_start_arguments(parser: argparse.ArgumentParser) -> None:
    """`start` accepts the console chat's options (used when no token is configured) and
    `run`'s."""
    console.add_arguments(parser)  # its --log-level too


def start_main(args: argparse.Namespace) -> int:
    """Discord if a token is configured, else the console chat."""
    if get_settings().discord_token is not None:
        return run_main(args)
    return console.main(args)
