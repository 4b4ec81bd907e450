"""/privacy forget-me, export, opt-out, opt-in; the retention task (HISTORY_RETENTION_DAYS)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

if TYPE_CHECKING:
    from bot.client import ChatBot

CONFIRM_TIMEOUT_S = 120.0
FORGET_PROMPT = (
    "This deletes every message of yours the bot stored in this server's channels and in your "
    "DMs with it, and the bot's replies to them. It cannot be undone."
)


class ConfirmForget(discord.ui.View):
    """The confirmation under /privacy forget-me: only the user who asked may press it."""

    def __init__(self, bot: ChatBot, user_id: int, guild_id: int | None) -> None:
        super().__init__(timeout=CONFIRM_TIMEOUT_S)
        self.bot = bot
        self.user_id = user_id
        self.guild_id = guild_id
        self.asked: discord.Interaction | None = None  # the /privacy forget-me interaction

    async def on_timeout(self) -> None:
        """Unanswered: say so and take the buttons away (the interaction token still works)."""
        if self.asked is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.asked.edit_original_response(
                    content="No answer in time; nothing was deleted.", view=None
                )

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message(
                "Only the member who asked can confirm this.", ephemeral=True
            )
            return False
        return True

    @discord.ui.button(label="Delete my data", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        self.stop()
        done = await self.bot.chat.privacy.forget_me(self.user_id, self.guild_id)
        await interaction.response.edit_message(
            content=(
                f"Deleted {done.turns} message(s) of yours, {done.replies} reply(ies) of the bot "
                f"to them and {done.pending} message(s) waiting for an answer."
            ),
            view=None,
        )
        for channel_id, message_id in done.placeholders:  # "in line" for a message now gone
            shown = self.bot.get_partial_messageable(channel_id).get_partial_message(message_id)
            with contextlib.suppress(discord.HTTPException):
                await shown.delete()

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        self.stop()
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)


class PrivacyCommands(commands.Cog):
    """Every user's own data: delete it, download it, stop it being stored."""

    group = app_commands.Group(name="privacy", description="Your data the bot stores")

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self._retention: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        if self.bot.settings.history_retention_days > 0:
            privacy = self.bot.chat.privacy
            self._retention = asyncio.create_task(
                privacy.retain(self.bot.settings.history_retention_days)
            )

    async def cog_unload(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention

    @group.command(name="forget-me", description="Delete your stored messages (asks first)")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        view = ConfirmForget(self.bot, interaction.user.id, interaction.guild_id)
        await interaction.response.send_message(FORGET_PROMPT, view=view, ephemeral=True)
        view.asked = interaction

    @group.command(name="export", description="Download what the bot stored of yours (JSON)")
    async def export(self, interaction: discord.Interaction) -> None:
        data = await self.bot.chat.privacy.export(interaction.user.id, interaction.guild_id)
        raw = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")
        file = discord.File(io.BytesIO(raw), filename="my-data.json")
        count = len(data["messages"])
        await interaction.response.send_message(
            f"Your stored data: {count} message(s).", file=file, ephemeral=True
        )

    @group.command(name="opt-out", description="Stop storing your messages (and training on them)")
    async def opt_out(self, interaction: discord.Interaction) -> None:
        await self.bot.chat.privacy.set_opted_out(interaction.user.id, True)
        await interaction.response.send_message(
            "Opted out: your messages are no longer stored (the bot still answers each one on "
            "its own, without the conversation) and are left out of training exports. "
            "/privacy forget-me deletes what was stored before.",
            ephemeral=True,
        )

    @group.command(name="opt-in", description="Store your messages again, as part of the chat")
    async def opt_in(self, interaction: discord.Interaction) -> None:
        await self.bot.chat.privacy.set_opted_out(interaction.user.id, False)
        await interaction.response.send_message(
            "Opted in: your messages are stored again and the bot remembers the conversation.",
            ephemeral=True,
        )


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(PrivacyCommands(bot))
