"""Buttons under the bot's last reply in a channel: regenerate, continue, stop.

Persistent across restarts: each button is a `discord.ui.DynamicItem` whose custom id carries
the action and the stored reply's row id (`reply:regen:<row id>`), registered once with
`bot.add_dynamic_items` when the chat cog loads (in the bot's setup_hook), so a button under
an old message works after a restart. Who may press: the member who asked for the reply, and
members who can manage messages (checked here, on every press).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import discord

from bot.cogs.checks import can_manage, refusal
from bot.errors import ReplyError
from bot.replies import StreamedReply
from bot.thinking import thinking_notes
from bot.turns import Speaker

if TYPE_CHECKING:
    from bot.client import ChatBot
    from bot.reply import Reply

log = logging.getLogger(__name__)
NONE = discord.AllowedMentions.none()

REGENERATE, CONTINUE, STOP = "regen", "cont", "stop"
LOOK: dict[str, tuple[str, str, discord.ButtonStyle]] = {
    REGENERATE: ("Regenerate", "\N{ANTICLOCKWISE DOWNWARDS AND UPWARDS OPEN CIRCLE ARROWS}",
                 discord.ButtonStyle.secondary),
    CONTINUE: ("Continue", "\N{BLACK RIGHT-POINTING TRIANGLE}", discord.ButtonStyle.primary),
    STOP: ("Stop", "\N{BLACK SQUARE FOR STOP}", discord.ButtonStyle.danger),
}  # fmt: skip
APOLOGY = "Sorry, something went wrong while answering; please try again."
STOPPED = "(stopped)"
HISTORY_CUT = (
    "(This conversation no longer fits in my memory: from here on I forget its oldest messages.)"
)
GONE = "That reply is no longer there."
NOT_YOURS = "Only the person who asked, or someone who can manage messages, can use these buttons."
FINISHED = "That reply has already finished."
CLOSED = "This thread is closed."
RESTARTING = "I'm restarting; please try again in a moment."


class ReplyButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"reply:(?P<action>regen|cont|stop):(?P<row>[0-9]{1,20})",
):
    """One button under a reply; its custom id says what it does to which stored reply."""

    def __init__(self, action: str, row_id: int) -> None:
        label, emoji, style = LOOK[action]
        button: discord.ui.Button = discord.ui.Button(
            label=label, emoji=emoji, style=style, custom_id=f"reply:{action}:{row_id}"
        )
        super().__init__(button)
        self.action, self.row_id = action, row_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> ReplyButton:
        return cls(match["action"], int(match["row"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await press(interaction, self.action, self.row_id)


def _view(row_id: int, *actions: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(ReplyButton(action, row_id))
    return view


def stop_view(row_id: int) -> discord.ui.View:
    """While a reply streams: stop."""
    return _view(row_id, STOP)


def done_view(row_id: int, can_continue: bool) -> discord.ui.View:
    """Under a finished reply: regenerate, and continue when max_tokens cut it."""
    return _view(row_id, REGENERATE, *([CONTINUE] if can_continue else []))


async def move_buttons(
    bot: ChatBot,
    out: StreamedReply,
    reply: Reply,
    *,
    reused: Collection[int] = (),
    take_over: bool = True,
) -> None:
    """The finished reply's buttons go on its last message and off its other messages (the
    first held stop; `reused` ones may hold old buttons); `take_over`: off the channel's
    previous reply too, so only the last reply of a channel has buttons."""
    row_id = reply.row_id
    if row_id is None or not out.messages:
        return
    result = reply.result
    more = not reply.stopped and result is not None and result.finish_reason == "length"
    try:
        await out.set_view(len(out.messages) - 1, done_view(row_id, more))
        for i, message in enumerate(out.messages[:-1]):
            if i == 0 or message.id in reused:
                await out.set_view(i, None)
        if take_over:
            info = await bot.chat.reply_info(row_id)
            previous = info[2] if info is not None else None
            if previous is not None and previous.discord_message_ids:
                last = previous.discord_message_ids[-1]
                old = out.channel.get_partial_message(last)  # type: ignore[attr-defined]
                await old.edit(view=None, allowed_mentions=NONE)
    except discord.HTTPException as exc:
        log.info("cannot move the reply buttons in channel %s: %s", out.channel.id, exc)


def footer(notes: Sequence[str]) -> str:
    """Notes shown under a reply, one short italic line each."""
    return "".join(f"\n\n*{n}*" if i == 0 else f"\n*{n}*" for i, n in enumerate(notes))


def closed_thread(channel: object) -> bool:
    """An archived or locked thread: the bot neither answers there nor reports errors."""
    return isinstance(channel, discord.Thread) and (channel.archived or channel.locked)


async def deliver(
    bot: ChatBot,
    reply: Reply,
    out: StreamedReply,
    *,
    notes: Sequence[str] = (),
    reused: Collection[int] = (),
    take_over: bool = True,
    prefix: str = "",
) -> str | None:
    """Stream `reply` into `out`: a stop button while it streams, the notes and the reply's own
    (stopped, history cut) under it, then regenerate/continue buttons on its last message
    (`take_over`: removed from the channel's previous reply; `reused`, `prefix`: a regenerated
    or continued reply's messages and text). A failure after text was shown ends the text with
    its line; one before is returned for the caller to say."""
    try:
        async with reply:
            if reply.row_id is not None:
                out.view = stop_view(reply.row_id)
            if prefix:  # a continued reply: its text so far, shown as it is stored
                await out.push(prefix)
            problem: str | None = None
            try:
                async for piece in reply:
                    await out.push(piece)
                    reply.message_ids[:] = out.message_ids
                if reply.result is not None and not reply.stopped:
                    bot.record_speed(reply.result.tokens_per_s)
            except ReplyError as exc:
                problem = exc.user_message
            finally:
                reply.message_ids[:] = out.message_ids
            shown = [*notes, *([STOPPED] if reply.stopped else [])]
            shown += [HISTORY_CUT] if reply.history_cut else []
            shown += thinking_notes(reply.stream, bot.settings.show_thinking)
            if problem is not None and not out.messages:
                return problem
            await out.finish(footer([*([problem] if problem else []), *shown]))
            await out.drop_unused()
            reply.message_ids[:] = out.message_ids
            await move_buttons(bot, out, reply, reused=reused, take_over=take_over)
    except ReplyError as exc:
        return exc.user_message
    except discord.HTTPException as exc:  # an archived thread, a deleted channel...
        log.warning("Discord refused a reply in channel %s: %s", out.channel.id, exc)
        problem = APOLOGY
    except Exception:
        log.exception("reply failed in channel %s", out.channel.id)
        problem = APOLOGY
    else:
        return None
    if out.messages:  # under the text already shown, if Discord still takes it
        with contextlib.suppress(discord.HTTPException):
            await out.finish(footer([problem]))
            return None
    return problem


async def _tell(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral line to whoever pressed (a response, or a follow-up once deferred)."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.info("cannot answer a button press: %s", exc)


def _allowed(interaction: discord.Interaction, asker: int | None) -> bool:
    settings = getattr(interaction.client, "settings", None)
    admins = list(getattr(settings, "admin_user_ids", []) or [])
    resolved = interaction.permissions if interaction.guild_id is not None else None
    return interaction.user.id == asker or can_manage(interaction.user, admins, resolved)


async def press(interaction: discord.Interaction, action: str, row_id: int) -> None:
    """A reply button was pressed: check who and where, then stop, regenerate or continue."""
    bot: ChatBot = interaction.client  # type: ignore[assignment]
    info = await bot.chat.reply_info(row_id)
    if info is None or info[0].channel_id != interaction.channel_id:
        await _tell(interaction, GONE)
        return
    row, asker, _ = info
    if not _allowed(interaction, asker):
        await _tell(interaction, NOT_YOURS)
        return
    channel: Any = interaction.channel
    if closed_thread(channel):
        await _tell(interaction, CLOSED)
        return
    if action == STOP:
        if bot.chat.stop(row_id):
            await interaction.response.defer()  # the reply ends, saying it was stopped
        else:
            await _tell(interaction, FINISHED)
        return
    if not bot.accepting or bot.user is None:
        await _tell(interaction, RESTARTING)
        return
    # a press that generates is a request like a message: the same gate (access lists, the
    # presser's opt-out, rate limits), and it counts
    refused = await refusal(
        bot, guild_id=interaction.guild_id, channel=channel, user=interaction.user, stores=True
    )
    if refused is not None:
        await _tell(interaction, refused.text)
        return
    await interaction.response.defer()  # the reply's messages change as the new text streams
    me = Speaker(bot.user.id, bot.user.display_name, is_bot=True)
    ids = list(row.discord_message_ids or [])
    out = StreamedReply(
        channel,
        edit_interval_s=bot.settings.edit_interval_s,
        reuse=[channel.get_partial_message(i) for i in ids],
    )
    if action == CONTINUE:
        reply = bot.chat.continue_reply(row_id, channel_id=row.channel_id, bot=me)
        prefix = row.content
    else:
        reply = bot.chat.regenerate(row_id, channel_id=row.channel_id, bot=me)
        prefix = ""
    with bot.in_flight():
        problem = await deliver(bot, reply, out, reused=ids, take_over=False, prefix=prefix)
    if problem is not None:
        await _tell(interaction, problem)
