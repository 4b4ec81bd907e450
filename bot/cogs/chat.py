"""The chat cog: answers mentions, replies to the bot, DMs and auto-reply channels, streaming."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.cogs.triggers import ChatLimits, answer_reason, strip_mention
from bot.errors import ReplyError
from bot.replies import StreamedReply
from bot.turns import IncomingMessage, Speaker

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong while answering; please try again."
EMPTY_PROMPT = "Say something after the mention and I'll answer."
EMPTY_REPLY = "(the model gave an empty answer)"
NONE = discord.AllowedMentions.none()


async def note(message: discord.Message, text: str) -> None:
    """A short reply to a message that pings nobody; failures to send are only logged."""
    try:
        await message.reply(text, allowed_mentions=NONE, mention_author=False)
    except discord.HTTPException as exc:
        log.warning("could not send a note in channel %s: %s", message.channel.id, exc)


@contextlib.asynccontextmanager
async def typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show typing while the body runs; a channel that refuses it does not stop the reply."""
    indicator = channel.typing()
    try:
        await indicator.__aenter__()
    except discord.HTTPException as exc:
        log.info("no typing indicator in this channel: %s", exc)
        yield
        return
    try:
        yield
    finally:
        await indicator.__aexit__(None, None, None)


class Chat(commands.Cog):
    """Turns Discord messages into `ChatService.reply` calls and streams the answers back."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        s = bot.settings
        self.limits = ChatLimits.per_minute(s.user_rate_per_min, s.channel_rate_per_min)

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

    async def allowed(self, message: discord.Message) -> bool:
        """The server's access lists (bot.access) let this author talk here; DMs always."""
        if message.guild is None:
            return True
        channel = message.channel
        channel_ids = [channel.id]
        parent_id = getattr(channel, "parent_id", None)
        if parent_id is not None:  # a thread: its parent channel's entries count too
            channel_ids.append(parent_id)
        roles = [role.id for role in getattr(message.author, "roles", [])]
        return await self.bot.chat.access.allows(
            message.guild.id, channel_ids=channel_ids, user_id=message.author.id, role_ids=roles
        )

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not self.bot.accepting:
            return
        try:
            why = await self.reason(message)
            if why is not None and not await self.allowed(message):
                why = None  # refused by the access lists: ignored, nothing stored
        except Exception:
            log.exception("cannot decide whether to answer message %s", message.id)
            return
        if why is None:
            return
        assert self.bot.user is not None
        content = strip_mention(message.content, self.bot.user.id)
        if not content:
            await note(message, EMPTY_PROMPT)
            return
        refused = self.limits.check(message.author.id, message.channel.id)
        if refused:
            await note(message, refused)
            return
        with self.bot.in_flight():
            await self.answer(message, content)

    async def answer(self, message: discord.Message, content: str) -> None:
        """Stream one reply to `message`; errors end it with a short note, never silence."""
        bot = self.bot
        assert bot.user is not None
        incoming = IncomingMessage(
            channel_id=message.channel.id,
            guild_id=message.guild.id if message.guild else None,
            author=Speaker(message.author.id, message.author.display_name, message.author.bot),
            content=content,
            message_id=message.id,
            is_dm=message.guild is None,
        )
        me = Speaker(bot.user.id, bot.user.display_name, is_bot=True)
        out = StreamedReply(
            message.channel, edit_interval_s=bot.settings.edit_interval_s, reference=message
        )
        problem: str | None = None
        try:
            async with typing(message.channel), bot.chat.reply(incoming, bot=me) as reply:
                try:
                    async for piece in reply:
                        await out.push(piece)
                        reply.message_ids[:] = out.message_ids
                    await out.finish()
                    if reply.result is not None:
                        bot.record_speed(reply.result.tokens_per_s)
                finally:
                    reply.message_ids[:] = out.message_ids
        except ReplyError as exc:
            problem = exc.user_message
        except discord.HTTPException as exc:
            log.warning("Discord refused a reply in channel %s: %s", message.channel.id, exc)
            problem = APOLOGY
        except Exception:
            log.exception("reply failed in channel %s", message.channel.id)
            problem = APOLOGY
        if problem is not None:
            if out.messages:
                try:
                    await out.finish(f"\n\n*{problem}*")
                except discord.HTTPException:
                    await note(message, problem)
            else:
                await note(message, problem)
        elif not out.messages:
            await note(message, EMPTY_REPLY)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Chat(bot))
