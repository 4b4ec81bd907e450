"""`python -m bot chat`: the conversation logic, engine and database in a terminal (or a pipe)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import io
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sqlalchemy.engine import make_url

from bot.config import BotConfig, ConfigError, load_settings
from bot.errors import LENGTH_NOTE, quoted
from bot.logs import add_log_level_argument

if TYPE_CHECKING:
    from bot.service import ChatService

CONSOLE_CHANNEL_ID = 1  # the console's own "channel" in the database (Discord ids are far larger)
CONSOLE_USER_ID = 1
CONSOLE_BOT_ID = 0


def _help() -> str:
    """The console's commands; the settings and their ranges come from bot.generation."""
    from bot.generation import SETTINGS

    ranges = ", ".join(  # NUL keeps a name and its range on one line
        f"{s.shown_name}\0{'N|none' if s.optional else s.range_text()}" for s in SETTINGS.values()
    )
    indent = " " * 29
    wrapped = textwrap.fill("change one: " + ranges, width=100 - len(indent))
    settings_set = wrapped.replace("\n", "\n" + indent).replace("\0", " ")
    return f"""\
Type a message and press Enter to chat. Commands:
  /help                      this list
  /settings show             the generation settings of this conversation
  /settings set KEY VALUE    {settings_set}
  /settings reset            back to the model's defaults
  /persona set TEXT          the system prompt of this conversation
  /persona show | clear
  /forget                    start over: earlier turns leave the conversation memory
  /quit                      leave (so does end of input, Ctrl-D)
Ctrl-C while the bot answers stops that answer; at the prompt it leaves."""


GOODBYE = "Goodbye!"
CANCELLED = "[reply cancelled]"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings `chat`, `start` and `run` take as options too (over the environment)."""
    parser.add_argument("--model", default=None, help="version: NAME, NAME@N or a folder (MODEL)")
    parser.add_argument("--registry", default=None, help="registry folder (MODEL_REGISTRY)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None, help="DEVICE")
    parser.add_argument("--database-url", default=None, help="database URL (DATABASE_URL)")


def setting_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as options (add_settings_arguments), by their BotConfig names."""
    given = (
        ("model", getattr(args, "model", None)),
        ("model_registry", getattr(args, "registry", None)),
        ("device", getattr(args, "device", None)),
        ("database_url", getattr(args, "database_url", None)),
    )
    return {key: value for key, value in given if value is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)
    parser.add_argument(
        "--channel", type=int, default=CONSOLE_CHANNEL_ID, help="conversation id (default 1)"
    )
    add_log_level_argument(parser)


def history_place(database_url: str, channel_id: int) -> str:
    """Where the console's conversation is stored, and how to start fresh, in one line."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        where = f"the SQLite file {url.database}" if url.database else "an in-memory database"
    else:
        where = url.render_as_string(hide_password=True)
    return (
        f"This conversation (number {channel_id}) is kept in {where}; /forget starts it fresh, "
        "--channel N opens another."
    )


def _lines_of(stdin: TextIO) -> Iterator[str]:
    """The input's lines. A real file descriptor is read with os.read, so the reader thread, left
    blocked when the chat ends, holds no lock of sys.stdin that interpreter shutdown needs."""
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        yield from iter(stdin.readline, "")
        return
    encoding = getattr(stdin, "encoding", None) or "utf-8"
    pending = b""
    while chunk := os.read(fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield (line + b"\n").decode(encoding, "replace")
    if pending:
        yield pending.decode(encoding, "replace")


class Console:
    """Reads lines, runs `/` commands, streams replies; output goes to `out`."""

    def __init__(
        self,
        service: ChatService,
        out: TextIO,
        *,
        channel_id: int,
        user_name: str,
        history: str | None = None,
    ):
        from bot.turns import Speaker

        self.service = service
        self.out = out
        self.channel_id = channel_id
        self.history = history
        self.user = Speaker(CONSOLE_USER_ID, user_name)
        self.bot = Speaker(CONSOLE_BOT_ID, "bot", is_bot=True)
        self._replying: asyncio.Task[None] | None = None
        self._lines: asyncio.Queue[str | None] | None = None
        self._wrote = False
        self._interrupted = False

    @property
    def replying(self) -> bool:
        """True while a reply is being written (Ctrl-C then stops it)."""
        return self._replying is not None and not self._replying.done()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def interrupt(self) -> None:
        """Ctrl-C: stop the reply being written, if any; else leave the chat."""
        if self._replying is not None and self.replying:
            self._replying.cancel()
        elif self._lines is not None:
            self._interrupted = True
            self._lines.put_nowait(None)

    async def handle(self, line: str) -> bool:
        """One input line; False when the user asked to quit."""
        from bot.errors import ReplyError
        from bot.generation import SettingsError

        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/"):
                return await self.command(text)
            await self.chat(text)
        except SettingsError as exc:
            self.say(f"error: {exc}")
        except ReplyError as exc:
            self.say(f"[{exc.user_message}]")
        return True

    async def chat(self, text: str) -> None:
        """One reply, streamed; `interrupt()` cancels it (stored as interrupted) and the chat
        goes on."""
        from bot.errors import ReplyError

        self._wrote = False
        task = asyncio.ensure_future(self._stream(text))
        self._replying = task
        try:
            await asyncio.wait({task})
        finally:
            self._replying = None
            if not task.done():  # the console itself is being cancelled
                task.cancel()
        if task.cancelled():
            self.say(("\n" if self._wrote else "") + CANCELLED)
            return
        try:
            note = task.result()
        except ReplyError:
            if self._wrote:
                self.say("")  # the note goes on its own line, after the partial reply
            raise
        self.say("")
        if note:
            self.say(f"[{note}]")

    async def _stream(self, text: str) -> str | None:
        from bot.turns import IncomingMessage

        msg = IncomingMessage(self.channel_id, None, self.user, text)
        async with self.service.reply(msg, bot=self.bot) as reply:
            async for piece in reply:
                self.out.write(piece)
                self.out.flush()
                self._wrote = True
        result = reply.result
        if result is not None and result.finish_reason == "length" and not reply.stopped:
            return LENGTH_NOTE  # said under the reply, as on Discord
        return None

    async def command(self, text: str) -> bool:
        name, _, rest = text[1:].partition(" ")
        sub, _, arg = rest.strip().partition(" ")
        name, sub, arg = name.lower(), sub.lower(), arg.strip()
        channel, actor = self.channel_id, self.user.id
        if name in ("quit", "exit", "q"):
            self.say(GOODBYE)
            return False
        if name == "help":
            self.say(_help() + (f"\n{self.history}" if self.history else ""))
        elif name == "settings" and sub in ("", "show"):
            self.say("\n".join((await self.service.get_settings(channel)).describe()))
        elif name == "settings" and sub == "set":
            key, _, value = arg.partition(" ")
            if not key or not value.strip():
                self.say("usage: /settings set KEY VALUE (e.g. /settings set temperature 0.5)")
            else:
                updated = await self.service.update_settings(channel, actor, **{key: value})
                self.say(updated.shown(key.strip().lower()))
        elif name == "settings" and sub == "reset":
            await self.service.reset_settings(channel, actor)
            self.say("settings reset to the model's defaults")
        elif name == "persona" and sub == "set":
            if not arg:
                self.say("usage: /persona set TEXT")
            else:
                await self.service.set_persona(channel, arg, actor)
                self.say("persona set")
        elif name == "persona" and sub in ("", "show"):
            persona = await self.service.get_persona(channel)
            self.say(persona or "no persona: the model's default system prompt applies")
        elif name == "persona" and sub == "clear":
            await self.service.clear_persona(channel, actor)
            self.say("persona cleared")
        elif name == "forget":
            count = await self.service.forget(channel, actor)
            self.say(f"forgot {count} turn(s)")
        else:
            self.say(f"unknown command {quoted(text.split()[0])}; /help lists the commands")
        return True

    async def run(self, stdin: TextIO) -> None:
        """Line by line until /quit, end of input or Ctrl-C at the prompt (a pipe works as well
        as a terminal). Lines are read in a daemon thread, so a prompt waiting for input never
        keeps the process alive."""
        loop = asyncio.get_running_loop()
        interactive = stdin.isatty()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._lines = lines

        def read() -> None:
            try:
                for line in _lines_of(stdin):
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                loop.call_soon_threadsafe(lines.put_nowait, None)
            except (RuntimeError, OSError):  # the loop is closed, or stdin is gone
                return

        threading.Thread(target=read, name="console-input", daemon=True).start()
        if interactive:
            self.say(
                f"Chatting with {self.service.backend.model.ref}; /help for commands, "
                "/quit to leave."
            )
            if self.history:
                self.say(self.history)
        try:
            while True:
                if interactive:
                    self.out.write("> ")
                    self.out.flush()
                line = await lines.get()
                if line is None:  # end of input, or Ctrl-C at the prompt
                    if interactive or self._interrupted:
                        self.say(("\n" if interactive else "") + GOODBYE)
                    return
                if not await self.handle(line):
                    return
        finally:
            self._lines = None


async def chat(settings: BotConfig, model: Path, channel_id: int) -> None:
    from bot.backends import LocalBackend
    from bot.engine import Engine
    from bot.service import ChatService
    from bot.storage.db import Database

    db = await Database.open(settings.database_url)
    engine = None
    try:
        engine = await Engine.start(model, **settings.engine_options())
        service = ChatService(db, LocalBackend(engine), settings)
        console = Console(
            service,
            sys.stdout,
            channel_id=channel_id,
            user_name=_user_name(),
            history=history_place(settings.database_url, channel_id),
        )
        loop = asyncio.get_running_loop()
        # Ctrl-C stops the reply being written, or leaves at the prompt (where signal handlers
        # cannot be installed, it raises KeyboardInterrupt and main() leaves quietly)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, console.interrupt)
        try:
            await console.run(sys.stdin)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
    finally:
        if engine is not None:
            await engine.close()
        await db.close()


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "you"


def main(args: argparse.Namespace) -> int:
    level = getattr(args, "log_level", None) or "WARNING"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    overrides = setting_overrides(args)
    from bot.engine import EngineError
    from bot.engine.loader import resolve_version
    from bot.storage.db import DatabaseError

    try:
        settings = load_settings(**overrides)
        model = resolve_version(settings.model, settings.model_registry)
    except (ConfigError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: leave quietly
            asyncio.run(chat(settings, model, args.channel))
    except (EngineError, DatabaseError) as exc:  # a model that does not load, a bad database
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
