"""The discord.py client: ChatBot runs ChatService behind cogs and closes cleanly; create_bot.

`python -m bot run` (bot/cli.py) resolves the model version and runs the bot. Tests start it
in-process against a Discord-compatible server:

    settings = BotConfig(discord_api_base="http://127.0.0.1:PORT/api/v10",
                         discord_gateway_url="ws://127.0.0.1:PORT/gateway", ...)
    bot = await create_bot(settings)       # sets discord.http.Route.BASE: see below
    task = asyncio.create_task(bot.start("any-token"))   # login, setup_hook, gateway
    await bot.wait_until_ready()
    ...
    await bot.close()                      # waits for in-flight replies, closes engine and DB

The API base is process-wide: discord.py builds every URL, the interaction webhooks' included,
from the class attribute `discord.http.Route.BASE` and offers no per-client setting, so
`create_bot` sets it for the whole process (one API base per process). The gateway is per
client: ChatBot is an AutoShardedBot because, in discord.py 2.7, only the sharded client asks
`HTTPClient.get_bot_gateway` (GET /gateway/bot) where to connect, and ChatBot answers that call
on its own HTTP client with `discord_gateway_url` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands
from discord.gateway import DiscordWebSocket

from bot.config import BotConfig, ConfigError
from bot.errors import fitted

if TYPE_CHECKING:
    from bot.backends import GenerationBackend
    from bot.service import ChatService
    from bot.storage.db import Database

log = logging.getLogger(__name__)

COGS = (
    "bot.cogs.chat",
    "bot.cogs.channel",
    "bot.cogs.admin",
    "bot.cogs.finetune",  # after admin: it adds /model finetune and /model jobs
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
    backend: GenerationBackend  # the in-process engine, or Redis workers when REDIS_URL is set
    chat: ChatService

    def __init__(self, settings: BotConfig, *, model: str | Path | None = None) -> None:
        intents = discord.Intents.none()
        intents.guilds = intents.messages = intents.message_content = intents.dm_messages = True
        intents.guild_messages = True
        shards = settings.shards()  # SHARD_IDS of SHARD_COUNT; None: as Discord advises
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            shard_count=shards[1] if shards else None,
            shard_ids=shards[0] if shards else None,
        )
        self.settings = settings
        self.model = model
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

    async def prepare(self) -> None:
        """Open the database and start the engine (once). `serve` calls it before connecting to
        Discord, so an operator's mistake (a bad DATABASE_URL, a broken version) is reported
        at once, as one line, without a gateway session."""
        if getattr(self, "chat", None) is not None:
            return
        from bot.service import ChatService
        from bot.storage.db import Database

        s = self.settings
        self.db = await Database.open(s.database_url, shards=s.shards())
        try:
            self.backend = await self._start_backend()
        except BaseException:
            await self.db.close()
            raise
        self.chat = ChatService(self.db, self.backend, s)

    async def _start_backend(self) -> GenerationBackend:
        """Redis workers when REDIS_URL is set (no engine in this process), else the engine."""
        s = self.settings
        if s.redis_url:
            from bot.backends.redis_backend import RedisBackend

            return await RedisBackend.connect(
                s.redis_url,
                self.model or s.model,
                registry=s.model_registry,
                prefix=s.redis_prefix,
                max_queue=s.engine_max_queue,
            )
        from bot.backends import LocalBackend

        return await LocalBackend.start(self.model or s.model, **s.engine_options())

    async def setup_hook(self) -> None:
        await self.prepare()
        for name in COGS:
            await self.load_extension(name)
        await self.sync_commands()
        log.info("ready to chat with %s", self.backend.model.ref)

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

    @property
    def shut_down(self) -> bool:
        """True once close() has run to its end: engine and database closed."""
        return self._shutdown is not None and self._shutdown.done()

    async def __aexit__(self, *exc_info: object) -> None:
        """Leaving `async with bot:` waits for the whole shutdown. discord.py's own __aexit__
        skips close() once the gateway is closed, which let `asyncio.run` end (and cancel the
        database's close, logging an ERROR) while close() was still running."""
        await self.close()

    async def _close(self) -> None:
        self.accepting = False
        if self.active_replies:
            log.info("waiting for %d reply(ies) to finish", self.active_replies)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_grace_s)
        backend = getattr(self, "backend", None)
        if backend is not None:
            await backend.close()  # unfinished streams end as cancelled; replies store them
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
        text = fitted(text)
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=text)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("cannot report a command error: %s", exc)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        log.exception("error in %s", event_method)


async def create_bot(settings: BotConfig, *, model: str | Path | None = None) -> ChatBot:
    """A ChatBot pointed at settings.discord_api_base (the gateway follows in login) that runs
    `model` (a resolved version folder; None: settings.model, resolved by the engine's loader)."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.shard_count and settings.discord_gateway_url:
        # With an explicit SHARD_COUNT discord.py does not ask GET /gateway/bot; it connects to
        # this class attribute, process-wide like Route.BASE.
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    return ChatBot(settings, model=model)
