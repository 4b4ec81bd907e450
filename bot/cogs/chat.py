"""The chat cog: answers mentions, replies to the bot, DMs and auto-reply channels, streaming
(in threads when a channel asks for it; text attachments read; buttons under the last reply)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord.ext import commands

from bot import attachments
from bot.cogs.checks import refusal
from bot.cogs.controls import ReplyButton, closed_thread, deliver, done_view
from bot.cogs.triggers import ChatLimits, answer_reason, strip_mention
from bot.errors import RestartingError
from bot.replies import StreamedReply
from bot.turns import IncomingMessage, Speaker

if TYPE_CHECKING:
    from bot.client import ChatBot
    from bot.redis_limits import RedisChatLimits
    from bot.storage.models import PendingMessage

log = logging.getLogger(__name__)

EMPTY_PROMPT = "Say something after the mention and I'll answer."
EMPTY_REPLY = "(the model gave an empty answer)"
NONE = discord.AllowedMentions.none()
RECOVER_WITHIN = timedelta(minutes=15)  # after a restart, older unanswered messages are declined
INTERRUPTED = "*(interrupted: the bot restarted before this reply was finished)*"
MISSED = "I restarted before I could answer this; please ask again."
IN_LINE = "\u23f3 *in line: I answer earlier messages first*"
THREAD_NAME_CHARS = 80


def thread_name(content: str) -> str:
    """A thread's name from the message that starts it: its first line, shortened."""
    line = " ".join(content.split())
    return (line[: THREAD_NAME_CHARS - 3] + "...") if len(line) > THREAD_NAME_CHARS else line


async def note(message: discord.Message, text: str) -> None:
    """A short reply to a message that pings nobody; failures to send are only logged."""
    try:
        await message.reply(text, allowed_mentions=NONE, mention_author=False)
    except discord.HTTPException as exc:
        log.warning("could not send a note in channel %s: %s", message.channel.id, exc)


@contextlib.asynccontextmanager
async def typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show typing while the body runs; a channel that refuses it does not stop the reply.
    Entering does not wait for Discord (the request runs beside the body), so a reply takes
    its place in the channel's line in the order the messages arrived."""
    indicator = channel.typing()
    started = asyncio.ensure_future(indicator.__aenter__())
    try:
        yield
    finally:
        try:
            await started
        except discord.HTTPException as exc:
            log.info("no typing indicator in this channel: %s", exc)
        else:
            await indicator.__aexit__(None, None, None)


def chat_limits(bot: ChatBot) -> ChatLimits | RedisChatLimits:
    """Per-user and per-channel rate limits: in Redis when REDIS_URL is set (then they hold
    across shard processes, and `check` is a coroutine), else in this process."""
    s = bot.settings
    if s.redis_url:
        from bot.redis_limits import RedisChatLimits

        client = bot.backend.client  # type: ignore[attr-defined]  # RedisBackend's
        return RedisChatLimits.per_minute(
            client, s.user_rate_per_min, s.channel_rate_per_min, s.redis_prefix
        )
    return ChatLimits.per_minute(s.user_rate_per_min, s.channel_rate_per_min)


class _Turn:
    """One message's place in its channel's arrival order (see _Arrivals)."""

    def __init__(self, arrivals: _Arrivals, channel_id: int, before: asyncio.Future | None):
        self._arrivals, self._channel_id, self._before = arrivals, channel_id, before
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait(self) -> None:
        if self._before is not None:
            await asyncio.shield(self._before)

    def release(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
            self._arrivals.forget(self._channel_id, self.done)


class _Arrivals:
    """Messages of a channel take their places in the channel's line in the order they arrived,
    whatever they await before (access lists, rate limits in Redis, files, threads)."""

    def __init__(self) -> None:
        self._last: dict[int, asyncio.Future[None]] = {}

    def take(self, channel_id: int) -> _Turn:
        turn = _Turn(self, channel_id, self._last.get(channel_id))
        self._last[channel_id] = turn.done
        return turn

    def forget(self, channel_id: int, done: asyncio.Future[None]) -> None:
        if self._last.get(channel_id) is done:
            del self._last[channel_id]


class Chat(commands.Cog):
    """Turns Discord messages into `ChatService.reply` calls and streams the answers back."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self._recovered = False
        self._recovering: set[asyncio.Task[None]] = set()
        self._left: list[PendingMessage] = []  # the inbox as the last run left it
        self.limits = chat_limits(bot)
        self._arrivals = _Arrivals()

    async def cog_load(self) -> None:
        """Before the gateway connects: what an earlier run accepted and never answered (read
        now, so that messages this run accepts are never taken for them)."""
        self._left = await self.bot.chat.pending()

    async def _replying_to_bot(self, message: discord.Message) -> bool:
        ref = message.reference
        me = self.bot.user
        if ref is None or ref.message_id is None or me is None:
            return False
        target = ref.resolved if isinstance(ref.resolved, discord.Message) else None
        if target is None:
            target = discord.utils.get(self.bot.cached_messages, id=ref.message_id)
        if target is None and ref.channel_id == message.channel.id:
            try:
                target = await message.channel.fetch_message(ref.message_id)
            except discord.HTTPException:
                return False
        return target is not None and target.author.id == me.id

    async def reason(self, message: discord.Message) -> str | None:
        """Why to answer this message, or None (the DB is asked about auto-reply only if needed)."""
        me = self.bot.user
        if me is None:
            return None
        from_bot = message.author.id == me.id or (
            message.author.bot and not self.bot.settings.reply_to_bots
        )
        is_dm = message.guild is None
        mentioned = me in message.mentions
        common = dict(
            from_bot=from_bot,
            is_dm=is_dm,
            mentioned=mentioned,
            reply_in_dms=self.bot.settings.reply_in_dms,
        )
        first = answer_reason(**common, replying_to_bot=False, autoreply=False)
        if first is not None or from_bot:
            return first
        replying = await self._replying_to_bot(message)
        autoreply = (
            not replying and not is_dm and await self.bot.chat.is_autoreply(message.channel.id)
        )
        return answer_reason(**common, replying_to_bot=replying, autoreply=autoreply)

    async def _closed(self, message: discord.Message) -> bool:
        """The message is in an archived or locked thread (one discord.py no longer caches
        is looked up: its archived threads leave the cache)."""
        channel: Any = message.channel
        if isinstance(channel, discord.PartialMessageable) and message.guild is not None:
            try:
                channel = await self.bot.fetch_channel(channel.id)
            except discord.HTTPException:
                return False
        return closed_thread(channel)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        turn = self._arrivals.take(message.channel.id)  # before anything can suspend
        try:
            await self._on_message(message, turn)
        finally:
            turn.release()

    async def _on_message(self, message: discord.Message, turn: _Turn) -> None:
        try:
            why = await self.reason(message)
            if why is not None and await self._closed(message):
                return
            refused = None
            if why is not None:  # the same gate as buttons and /ask: access, rate limits
                refused = await refusal(
                    self.bot,
                    guild_id=message.guild.id if message.guild else None,
                    channel=message.channel,
                    user=message.author,
                )
        except Exception:
            log.exception("cannot decide whether to answer message %s", message.id)
            return
        if why is None or (refused is not None and refused.by_access):
            return  # refused by the access lists: ignored, nothing stored
        if refused is not None:
            await note(message, refused.text)
            return
        if not self.bot.accepting:  # shutting down: say so rather than stay silent
            await note(message, RestartingError.user_message)
            return
        assert self.bot.user is not None
        content = strip_mention(message.content, self.bot.user.id)
        files = list(getattr(message, "attachments", None) or [])
        if not content and not files:
            await note(message, EMPTY_PROMPT)
            return
        with self.bot.in_flight():
            notes: list[str] = []
            if files:
                content, notes = await self.read_files(message, content, files)
                if not content:  # nothing but files it cannot read
                    await note(message, "\n".join(notes))
                    return
            channel = await self.thread_for(message, content)
            await turn.wait()  # the channel's earlier messages have taken their places in line
            turn.release()  # (answer() takes this one's before it first waits)
            await self.answer(message, content, notes=notes, channel=channel)

    async def read_files(
        self, message: discord.Message, content: str, files: list[discord.Attachment]
    ) -> tuple[str, list[str]]:
        """The message's text with its readable text files appended (all of it within half
        the prompt budget, each file cut to its share); and the notes about files skipped or
        cut."""
        bot = self.bot
        model = bot.backend.model
        settings = await bot.chat.get_settings(message.channel.id)
        budget = max(0, (model.max_context - settings.max_new_tokens) // 2)
        read: list[attachments.FileText] = []
        notes: list[str] = []
        for file in files:
            name = attachments.display_name(file.filename)
            if not attachments.is_text_file(file.filename, file.content_type):
                notes.append(attachments.ONLY_TEXT.format(name=name))
                continue
            if file.size > attachments.MAX_BYTES:  # before downloading anything
                size, limit = -(-file.size // 1000), attachments.MAX_BYTES // 1000
                notes.append(attachments.TOO_LARGE.format(name=name, size=size, limit=limit))
                continue
            try:
                data = await file.read()
            except (discord.DiscordException, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("cannot download attachment %s: %s", file.id, exc)
                notes.append(attachments.UNREADABLE.format(name=name))
                continue
            text = attachments.decode(data[: attachments.MAX_BYTES])
            if text is None:
                notes.append(attachments.ONLY_TEXT.format(name=name))
                continue
            read.append(attachments.FileText(name, text))
        if not read:
            return content, notes
        content, cut, dropped = await asyncio.to_thread(
            attachments.attach, content, read, budget, lambda t: len(model.encode_text(t))
        )
        notes += [attachments.CUT.format(name=name) for name in cut]
        notes += [attachments.NO_ROOM.format(name=name) for name in dropped]
        return content, notes

    async def thread_for(self, message: discord.Message, content: str) -> Any:
        """Where to answer: a new thread on the message in a channel whose answers go into
        threads (the thread is its own conversation, answered without mentions), else the
        message's channel (also when the thread cannot be made)."""
        channel = message.channel
        if not isinstance(channel, discord.TextChannel) or message.guild is None:
            return channel
        if not await self.bot.chat.replies_in_threads(channel.id):
            return channel
        try:
            thread = await message.create_thread(
                name=thread_name(content) or "conversation", auto_archive_duration=1440
            )
        except discord.HTTPException as exc:
            log.info("cannot start a thread in channel %s: %s", channel.id, exc)
            return channel
        await self.bot.chat.adopt_thread(thread.id, message.guild.id)
        return thread

    async def answer(
        self,
        message: discord.Message,
        content: str,
        *,
        notes: Sequence[str] = (),
        channel: Any = None,
        pending_id: int | None = None,
        held: Any = None,
    ) -> None:
        """Stream one reply to `message` (into `channel`, default the message's own); errors
        end it with a short note, never silence. While no text has come after
        PLACEHOLDER_AFTER_S (the message waits behind others), an "in line" placeholder is
        shown that the text then replaces. `pending_id`, `held`: the inbox row of a message
        accepted before a restart, and the placeholder shown for it then."""
        bot = self.bot
        assert bot.user is not None
        target = channel if channel is not None else message.channel
        incoming = IncomingMessage(
            channel_id=target.id,
            guild_id=message.guild.id if message.guild else None,
            author=Speaker(message.author.id, message.author.display_name, message.author.bot),
            content=content,
            message_id=message.id,
        )
        me = Speaker(bot.user.id, bot.user.display_name, is_bot=True)
        in_place = target is message.channel
        out = StreamedReply(
            target,
            edit_interval_s=bot.settings.edit_interval_s,
            reference=message if in_place else None,
            held=held,
        )
        reply = bot.chat.reply(incoming, bot=me, pending_id=pending_id)
        done = asyncio.Event()
        placeholder = asyncio.create_task(self._hold_place(out, reply, done))
        try:
            async with typing(target):
                problem = await deliver(bot, reply, out, notes=notes)
        finally:
            done.set()
            await placeholder  # a placeholder being posted now is deleted below, not left
            with contextlib.suppress(discord.HTTPException):
                await out.drop_unused()  # a placeholder no text replaced (an error, a refusal)
        if problem:
            await note(message, problem)
        elif problem is None and not out.messages:  # "": withdrawn, nothing to say
            await note(message, EMPTY_REPLY)

    async def _hold_place(self, out: StreamedReply, reply: Any, done: asyncio.Event) -> None:
        """After PLACEHOLDER_AFTER_S without text, show the "in line" placeholder (once)."""
        after = self.bot.settings.placeholder_after_s
        if after <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), after)
            return  # the reply ended first
        try:
            held = await out.hold(IN_LINE)
            if held is not None:
                await reply.hold(held.id)
        except discord.HTTPException as exc:  # the reply itself will say what is wrong
            log.info("cannot show the in-line placeholder: %s", exc)
        except Exception:  # never let the placeholder end the reply
            log.exception("cannot remember the in-line placeholder")

    # -- after a restart --
    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """Once per process: finish what a crash left. Replies cut mid-stream get a note in
        Discord; messages accepted and never answered are answered now, or declined with a note
        when they are older than RECOVER_WITHIN or gone from Discord."""
        if self._recovered:
            return
        self._recovered = True
        for channel_id, message_ids, row_id in self.bot.db.interrupted:
            if message_ids:
                await self._mark_interrupted(channel_id, message_ids, row_id)
        now = datetime.now(UTC)
        left, self._left = self._left, []
        for pending in left:
            try:
                await self._recover(pending, now)
            except Exception:  # one odd message must not stop the others' recovery
                log.exception("cannot recover message %s", pending.discord_message_id)

    async def _recover(self, pending: PendingMessage, now: datetime) -> None:
        """Answer one message accepted before the restart, or decline it with a note."""
        channel = await self._channel(pending.channel_id)
        if not self._serves(channel):
            return  # another shard process's message: that process answers it
        message = None
        if channel is not None and pending.discord_message_id is not None:
            with contextlib.suppress(discord.HTTPException):
                message = await channel.fetch_message(pending.discord_message_id)
        held = None  # the "in line" placeholder shown for it before the restart
        if channel is not None and pending.held_message_id is not None:
            with contextlib.suppress(discord.HTTPException):
                held = await channel.fetch_message(pending.held_message_id)
        refused = None
        if message is not None:  # the access lists may have changed since (counted already)
            guild_id = message.guild.id if message.guild else None
            refused = await refusal(
                self.bot, guild_id=guild_id, channel=channel, user=message.author, count=False
            )
        if message is None or refused or now - pending.received_at > RECOVER_WITHIN:
            await self.bot.chat.decline(pending.id)
            if held is not None:
                with contextlib.suppress(discord.HTTPException):
                    await held.delete()
            if message is not None and not refused:
                await note(message, MISSED)
            return
        log.info("answering message %s, accepted before the restart", message.id)
        task = asyncio.create_task(self._answer_recovered(message, pending, held))
        self._recovering.add(task)  # created in order: each channel keeps its order
        task.add_done_callback(self._recovering.discard)

    async def _answer_recovered(
        self, message: discord.Message, pending: PendingMessage, held: Any
    ) -> None:
        with self.bot.in_flight():
            await self.answer(message, pending.content, pending_id=pending.id, held=held)

    def _serves(self, channel: Any) -> bool:
        """Whether this process runs the shard of `channel`'s guild (DMs: shard 0); always true
        without SHARD_COUNT. An unknown channel (None) is declined by this process as before."""
        shards = self.bot.settings.shards()
        if shards is None or channel is None:
            return True
        guild = getattr(channel, "guild", None)
        shard = (guild.id >> 22) % shards[1] if guild is not None else 0
        return shard in shards[0]

    async def _channel(self, channel_id: int) -> discord.abc.Messageable | None:
        channel = self.bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(channel_id)
            except discord.HTTPException:
                return None
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def _mark_interrupted(self, channel_id: int, message_ids: list[int], row_id: int) -> None:
        """Append the interrupted note to the last Discord message of a cut reply, and set its
        buttons to what an interrupted reply allows: its Stop (on the first message, shown
        while it streamed) goes, Regenerate goes on the last message, as under any finished
        reply (an interrupted one cannot be continued)."""
        channel = await self._channel(channel_id)
        if channel is None:
            return
        view = done_view(row_id, can_continue=False)
        try:
            message = await channel.fetch_message(message_ids[-1])
            text = f"{message.content}\n\n{INTERRUPTED}"
            if len(text) <= 2000:
                await message.edit(content=text, view=view, allowed_mentions=NONE)
            else:
                await message.edit(view=view, allowed_mentions=NONE)
                await message.reply(INTERRUPTED, allowed_mentions=NONE, mention_author=False)
            if len(message_ids) > 1:  # the first message held the Stop button
                first = channel.get_partial_message(message_ids[0])  # type: ignore[attr-defined]
                await first.edit(view=None, allowed_mentions=NONE)
        except discord.HTTPException as exc:
            log.info("cannot mark reply message %s as interrupted: %s", message_ids[-1], exc)


async def setup(bot: ChatBot) -> None:
    bot.add_dynamic_items(ReplyButton)  # the reply buttons, persistent across restarts
    await bot.add_cog(Chat(bot))
