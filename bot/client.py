"""Entry points of `python -m bot start|run` and the discord.py client (ChatBot) they run.

Tests start the bot in-process against a Discord-compatible server:

    settings = BotConfig(discord_api_base="http://127.0.0.1:PORT/api/v10",
                        discord_gateway_url="ws://127.0.0.1:PORT/gateway", ...)
    bot = await create_bot(settings)       # sets discord.http.Route.BASE to discord_api_base
    task = asyncio.create_task(bot.start("any-token"))   # login, setup_hook, gateway
    await bot.wait_until_ready()
    ...
    await bot.close()                      # waits for in-flight replies, closes engine and DB

ChatBot is an AutoShardedBot because, in discord.py 2.7, only the sharded client asks
`HTTPClient.get_bot_gateway` (GET /gateway/bot) where to connect; ChatBot answers that call with
`discord_gateway_url` when it is set (on its own HTTP client only, nothing patched globally).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot import console
from bot.config import BotConfig, ConfigError, get_settings

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.service import ChatService
    from bot.storage.db import Database

log = logging.getLogger(__name__)

PERMISSIONS = 274877975552  # View Channels, Send Messages, Send in Threads, Read History
NO_TOKEN_HELP = f"""\
No Discord token configured. To run the bot on Discord:
  1. Create an application at https://discord.com/developers/applications and add a Bot.
  2. On the Bot page, enable the "Message Content Intent" and copy the token.
  3. Set it: export DISCORD_TOKEN=... (or put DISCORD_TOKEN=... in .env).
  4. Invite the bot with the scopes `bot applications.commands`:
     https://discord.com/oauth2/authorize?client_id=APP_ID&scope=bot+applications.commands&permissions={PERMISSIONS}
Without a token, `python -m bot chat` chats in this terminal."""

COGS = (
    "bot.cogs.chat",
    "bot.cogs.channel",
    "bot.cogs.admin",
    "bot.cogs.access",
    "bot.cogs.privacy",
)
SESSION_LIMITS = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
APOLOGY = "Sorry, that command failed; the cause is in the bot's log."


def user_error(error: Exception) -> str | None:
    """The one-line message for errors users cause (refused checks, bad values), else None."""
    from bot.errors import ReplyError
    from bot.generation import SettingsError
    from export.registry import RegistryError

    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, ReplyError):
        return error.user_message
    if isinstance(error, app_commands.CheckFailure | SettingsError | RegistryError | ConfigError):
        return str(error) or "You can't use this command here."
    if type(error) is app_commands.AppCommandError:  # raised by our commands with a message
        return str(error)
    return None


class ChatBot(commands.AutoShardedBot):
    """The Discord side of the product: ChatService behind cogs, with a clean shutdown."""

    settings: BotConfig
    db: Database
    engine: Engine
    chat: ChatService

    def __init__(self, settings: BotConfig) -> None:
        intents = discord.Intents.none()
        intents.guilds = intents.messages = intents.message_content = intents.dm_messages = True
        intents.guild_messages = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
        )
        self.settings = settings
        self.accepting = True
        self.active_replies = 0
        self.started_at = time.monotonic()
        self._speeds: deque[float] = deque(maxlen=20)
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutdown: asyncio.Task[None] | None = None
        self._logged_in = False  # AutoShardedClient.close() fails on a bot that never logged in
        self._upstream_gateway = self.http.get_bot_gateway
        self.http.get_bot_gateway = self._get_bot_gateway  # type: ignore[method-assign]
        self.tree.error(self._on_app_command_error)

    async def _get_bot_gateway(self) -> tuple[int, str, dict[str, int]]:
        """(shards, gateway URL, session limits): DISCORD_GATEWAY_URL if set, else Discord's."""
        if self.settings.discord_gateway_url:
            return 1, self.settings.discord_gateway_url, dict(SESSION_LIMITS)
        return await self._upstream_gateway()

    # -- life cycle --
    async def login(self, token: str) -> None:
        self._logged_in = True
        await super().login(token)

    async def setup_hook(self) -> None:
        from bot.engine import Engine
        from bot.service import ChatService
        from bot.storage.db import Database

        s = self.settings
        self.db = await Database.open(s.database_url)
        self.engine = await Engine.start(console.resolve_model(s), **s.engine_options())
        self.chat = ChatService(self.db, self.engine, s)
        for name in COGS:
            await self.load_extension(name)
        await self.sync_commands()
        log.info("ready to chat with %s", self.engine.model.ref)

    async def sync_commands(self) -> None:
        """To COMMAND_GUILD_IDS (instant, for development) if set, else globally."""
        if self.settings.command_guild_ids:
            for guild_id in self.settings.command_guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def on_message(self, message: discord.Message) -> None:
        """Chat is the Chat cog's job; there are no prefix commands to process."""

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Counts a reply in progress, so that close() can wait for it."""
        self.active_replies += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active_replies -= 1
            if self.active_replies == 0:
                self._idle.set()

    def record_speed(self, tokens_per_s: float) -> None:
        if tokens_per_s > 0:
            self._speeds.append(tokens_per_s)

    def recent_speed(self) -> float | None:
        """Mean decode speed of the recent replies, tokens/s."""
        return sum(self._speeds) / len(self._speeds) if self._speeds else None

    async def close(self) -> None:
        """Stop taking work, let in-flight replies finish (up to shutdown_grace_s; the rest are
        cut and stored as interrupted), then disconnect and close the engine and the database."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._close())
        await asyncio.shield(self._shutdown)

    async def _close(self) -> None:
        self.accepting = False
        if self.active_replies:
            log.info("waiting for %d reply(ies) to finish", self.active_replies)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_grace_s)
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.close()  # unfinished streams end as cancelled; replies store them
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5)
        if self._logged_in:
            await super().close()
        db = getattr(self, "db", None)
        if db is not None:
            await db.close()

    # -- errors --
    async def _on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        text = user_error(error)
        if text is None:
            log.error(
                "command %s failed",
                getattr(interaction.command, "qualified_name", "?"),
                exc_info=error,
            )
            text = APOLOGY
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=text)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("cannot report a command error: %s", exc)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        log.exception("error in %s", event_method)


async def create_bot(settings: BotConfig) -> ChatBot:
    """A ChatBot pointed at settings.discord_api_base (the gateway follows in login)."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    return ChatBot(settings)


async def serve(settings: BotConfig, token: str) -> None:
    """Run until closed; SIGTERM and SIGINT close the bot gracefully."""
    console.resolve_model(settings)  # no model version: say so before connecting to Discord
    bot = await create_bot(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    async with bot:
        await bot.start(token)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`run` takes its configuration from the environment, .env or BOT_CONFIG."""


def run_main(args: argparse.Namespace) -> int:
    """Connect to Discord; without a token print how to get one and exit 2."""
    settings = get_settings()
    if settings.discord_token is None or not settings.discord_token.get_secret_value():
        print(NO_TOKEN_HELP, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings, settings.discord_token.get_secret_value()))
    except ConfigError as exc:
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
    """`start` accepts the console chat's options, used when no token is configured."""
    console.add_arguments(parser)


def start_main(args: argparse.Namespace) -> int:
    """Discord if a token is configured, else the console chat."""
    if get_settings().discord_token is not None:
        return run_main(args)
    return console.main(args)
