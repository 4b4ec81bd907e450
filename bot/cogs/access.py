"""/access: who may talk to the bot and where (allow/deny lists), and who may change settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.access import Effect, Kind
from bot.cogs.checks import managers_only
from bot.storage.models import Editors

if TYPE_CHECKING:
    from bot.client import ChatBot

NONE = discord.AllowedMentions.none()
Who = Literal["everyone", "managers"]


def _guild(interaction: discord.Interaction) -> int:
    if interaction.guild_id is None:
        raise app_commands.AppCommandError("Access lists belong to a server; use this in one.")
    return interaction.guild_id


def _targets(
    channel: discord.abc.Snowflake | None,
    role: discord.abc.Snowflake | None,
    user: discord.abc.Snowflake | None,
) -> list[tuple[Kind, int, str]]:
    found = [
        (kind, target.id, shown.format(target.id))
        for kind, target, shown in (
            (Kind.CHANNEL, channel, "<#{}>"),
            (Kind.ROLE, role, "<@&{}>"),
            (Kind.USER, user, "<@{}>"),
        )
        if target is not None
    ]
    if not found:
        raise app_commands.AppCommandError("Name a channel, a role or a user.")
    return found


class AccessCommands(commands.Cog):
    """Managers set, per server, who may talk to the bot where, and who may change settings."""

    group = app_commands.Group(
        name="access",
        description="Who may talk to the bot, where, and who may change its settings",
        default_permissions=discord.Permissions(manage_messages=True),
        guild_only=True,
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    async def _change(
        self,
        interaction: discord.Interaction,
        effect: Effect | None,
        channel: discord.abc.Snowflake | None,
        role: discord.abc.Snowflake | None,
        user: discord.abc.Snowflake | None,
    ) -> None:
        guild_id, actor = _guild(interaction), interaction.user.id
        access = self.bot.chat.access
        done = []
        for kind, target, shown in _targets(channel, role, user):
            if effect is None:
                removed = await access.remove_rule(guild_id, kind, target, actor)
                done.append(f"{shown}: {'removed' if removed else 'was on no list'}")
            else:
                await access.set_rule(guild_id, kind, target, effect, actor)
                done.append(f"{shown}: {'allowed' if effect is Effect.ALLOW else 'denied'}")
        rules = await access.rules(guild_id)
        text = "\n".join(done) + "\nNow:\n" + "\n".join(rules.describe())
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NONE)

    @group.command(name="allow", description="Put a channel, role or user on the allow list")
    @app_commands.describe(
        channel="only allowed channels get answers once one is allowed",
        role="only allowed roles/users get answers once one is allowed",
        user="only allowed users/roles get answers once one is allowed",
    )
    @managers_only(server_wide=True)
    async def allow(
        self,
        interaction: discord.Interaction,
        channel: discord.abc.GuildChannel | None = None,
        role: discord.Role | None = None,
        user: discord.User | None = None,
    ) -> None:
        await self._change(interaction, Effect.ALLOW, channel, role, user)

    @group.command(name="deny", description="Put a channel, role or user on the deny list")
    @app_commands.describe(
        channel="never answer here", role="never answer this role", user="never answer this user"
    )
    @managers_only(server_wide=True)
    async def deny(
        self,
        interaction: discord.Interaction,
        channel: discord.abc.GuildChannel | None = None,
        role: discord.Role | None = None,
        user: discord.User | None = None,
    ) -> None:
        await self._change(interaction, Effect.DENY, channel, role, user)

    @group.command(name="remove", description="Take a channel, role or user off the lists")
    @managers_only(server_wide=True)
    async def remove(
        self,
        interaction: discord.Interaction,
        channel: discord.abc.GuildChannel | None = None,
        role: discord.Role | None = None,
        user: discord.User | None = None,
    ) -> None:
        await self._change(interaction, None, channel, role, user)

    @group.command(name="show", description="The server's allow and deny lists and editors")
    @managers_only(server_wide=True)
    async def show(self, interaction: discord.Interaction) -> None:
        guild_id = _guild(interaction)
        access = self.bot.chat.access
        rules, editing = await access.rules(guild_id), await access.editing(guild_id)
        lines = [
            *rules.describe(),
            f"settings may be changed by: {editing.settings}",
            f"personas may be changed by: {editing.persona}",
        ]
        await interaction.response.send_message(
            "\n".join(lines), ephemeral=True, allowed_mentions=NONE
        )

    @group.command(name="clear", description="Empty the allow and deny lists")
    @managers_only(server_wide=True)
    async def clear(self, interaction: discord.Interaction) -> None:
        count = await self.bot.chat.access.clear(_guild(interaction), interaction.user.id)
        await interaction.response.send_message(
            f"Removed {count} entr{'y' if count == 1 else 'ies'}; everyone may talk to the bot "
            "in every channel.",
            ephemeral=True,
        )

    @group.command(name="editors", description="Who may change settings and personas here")
    @app_commands.describe(
        settings="who may use /settings set and reset (default: everyone)",
        persona="who may use /persona set and clear (default: managers)",
    )
    @managers_only(server_wide=True)
    async def editors(
        self,
        interaction: discord.Interaction,
        settings: Who | None = None,
        persona: Who | None = None,
    ) -> None:
        editing = await self.bot.chat.access.set_editing(
            _guild(interaction),
            interaction.user.id,
            settings=Editors(settings) if settings else None,
            persona=Editors(persona) if persona else None,
        )
        await interaction.response.send_message(
            f"Settings may be changed by: {editing.settings}; personas by: {editing.persona}.",
            ephemeral=True,
        )


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(AccessCommands(bot))
