"""Slash commands about a channel's conversation: /settings, /persona, /forget and /ask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.checks import editors_only, managers_only, require_manager, talkers_only
from bot.errors import ReplyError
from bot.generation import SETTINGS
from bot.replies import InteractionReply, split_message
from bot.turns import Speaker

if TYPE_CHECKING:
    from bot.client import ChatBot

NONE = discord.AllowedMentions.none()
EMPTY_ANSWER = "(the model gave an empty answer)"


def _option(name: str) -> Any:
    """A Discord option typed and ranged as the setting is (Discord enforces the range too)."""
    setting = SETTINGS[name]
    kind = setting.kind
    return app_commands.Range[kind, kind(setting.low), kind(setting.high)]  # type: ignore[valid-type]


# /settings set's options (seed is the console's only); their names are the settings' labels
OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "repetition_penalty",
    "no_repeat_ngram_size",
)
Temperature = _option("temperature")
TopP = _option("top_p")
TopK = _option("top_k")
MaxTokens = _option("max_new_tokens")
RepetitionPenalty = _option("repetition_penalty")
NoRepeatNgram = _option("no_repeat_ngram_size")


Scope = Literal["channel", "server"]
SERVER_SCOPE_REFUSAL = "Server-wide settings need the Manage Messages permission across the server."


def _guild(interaction: discord.Interaction) -> int:
    if interaction.guild_id is None:
        raise app_commands.AppCommandError("Server-wide settings only exist in a server.")
    return interaction.guild_id


def _channel(interaction: discord.Interaction) -> int:
    if interaction.channel_id is None:
        raise app_commands.AppCommandError("This command only works in a channel.")
    return interaction.channel_id


def code_block(lines: list[str]) -> str:
    return "```\n" + "\n".join(lines) + "\n```"


class ChannelCommands(commands.Cog):
    """Per-channel settings and persona, memory reset, and one-off questions."""

    settings_group = app_commands.Group(
        name="settings", description="This channel's generation settings"
    )
    persona_group = app_commands.Group(name="persona", description="This channel's persona")

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    # -- /settings --
    @settings_group.command(name="show", description="Show this channel's generation settings")
    @app_commands.describe(scope="this channel (default) or the server's defaults")
    async def settings_show(
        self, interaction: discord.Interaction, scope: Scope = "channel"
    ) -> None:
        chat = self.bot.chat
        if scope == "server":
            current = await chat.get_server_settings(_guild(interaction))
        else:
            current = await chat.get_settings(_channel(interaction), interaction.guild_id)
        await interaction.response.send_message(code_block(current.describe()), ephemeral=True)

    @settings_group.command(name="set", description="Change generation settings for this channel")
    @app_commands.describe(
        scope="this channel (default), or the server: defaults for channels without their own",
        **{SETTINGS[key].shown_name: SETTINGS[key].describe() for key in OPTIONS},
    )
    @editors_only("settings")
    async def settings_set(
        self,
        interaction: discord.Interaction,
        scope: Scope = "channel",
        temperature: Temperature | None = None,
        top_p: TopP | None = None,
        top_k: TopK | None = None,
        max_tokens: MaxTokens | None = None,
        repetition_penalty: RepetitionPenalty | None = None,
        no_repeat_ngram: NoRepeatNgram | None = None,
    ) -> None:
        given = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_tokens": max_tokens,
            "repetition_penalty": repetition_penalty,
            "no_repeat_ngram": no_repeat_ngram,
        }
        changes = {key: value for key, value in given.items() if value is not None}
        if not changes:
            await interaction.response.send_message(
                "Give at least one setting to change.", ephemeral=True
            )
            return
        chat, actor = self.bot.chat, interaction.user.id
        if scope == "server":
            guild_id = _guild(interaction)
            require_manager(interaction, SERVER_SCOPE_REFUSAL, server_wide=True)
            updated = await chat.update_server_settings(guild_id, actor, **changes)
            title = "Server defaults updated (channels' own values still win):\n"
        else:
            updated = await chat.update_settings(
                _channel(interaction), actor, guild_id=interaction.guild_id, **changes
            )
            title = "Settings updated:\n"
        await interaction.response.send_message(
            title + code_block(updated.describe()), ephemeral=True
        )

    @settings_group.command(name="reset", description="Back to the model's default settings")
    @app_commands.describe(scope="this channel's own values (default) or the server's defaults")
    @editors_only("settings")
    async def settings_reset(
        self, interaction: discord.Interaction, scope: Scope = "channel"
    ) -> None:
        chat, actor = self.bot.chat, interaction.user.id
        if scope == "server":
            guild_id = _guild(interaction)
            require_manager(interaction, SERVER_SCOPE_REFUSAL, server_wide=True)
            updated = await chat.reset_server_settings(guild_id, actor)
        else:
            updated = await chat.reset_settings(
                _channel(interaction), actor, guild_id=interaction.guild_id
            )
        await interaction.response.send_message(
            "Settings reset:\n" + code_block(updated.describe()), ephemeral=True
        )

    # -- /persona --
    @persona_group.command(name="set", description="Set this channel's system prompt")
    @app_commands.describe(text="who the bot is in this channel")
    @editors_only("persona")
    async def persona_set(self, interaction: discord.Interaction, text: str) -> None:
        await self.bot.chat.set_persona(_channel(interaction), text, interaction.user.id)
        await interaction.response.send_message("Persona set.", ephemeral=True)

    @persona_group.command(name="show", description="Show this channel's system prompt")
    async def persona_show(self, interaction: discord.Interaction) -> None:
        persona = await self.bot.chat.get_persona(_channel(interaction))
        text = persona or "No persona: the model's default system prompt applies."
        await interaction.response.send_message(
            split_message(text)[0], ephemeral=True, allowed_mentions=NONE
        )

    @persona_group.command(name="clear", description="Remove this channel's system prompt")
    @editors_only("persona")
    async def persona_clear(self, interaction: discord.Interaction) -> None:
        await self.bot.chat.clear_persona(_channel(interaction), interaction.user.id)
        await interaction.response.send_message("Persona cleared.", ephemeral=True)

    # -- /forget --
    @app_commands.command(name="forget", description="Clear this channel's conversation memory")
    @managers_only()
    async def forget(self, interaction: discord.Interaction) -> None:
        count = await self.bot.chat.forget(_channel(interaction), interaction.user.id)
        await interaction.response.send_message(
            f"Forgot {count} turn(s); the conversation starts over.", ephemeral=True
        )

    # -- /ask --
    @app_commands.command(name="ask", description="A one-off answer, without the channel history")
    @app_commands.describe(prompt="what to ask", ephemeral="only you see the answer")
    @talkers_only()
    async def ask(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 4000],
        ephemeral: bool = False,
    ) -> None:
        await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        bot = self.bot
        author = Speaker(interaction.user.id, interaction.user.display_name)
        out = InteractionReply(
            interaction, ephemeral=ephemeral, edit_interval_s=bot.settings.edit_interval_s
        )
        note = ""
        with bot.in_flight():
            try:
                async with bot.chat.ask(
                    prompt, channel_id=_channel(interaction), author=author
                ) as reply:
                    async for piece in reply:
                        await out.push(piece)
                    if reply.result is not None:
                        bot.record_speed(reply.result.tokens_per_s)
            except ReplyError as exc:
                note = ("\n\n" if out.text.strip() else "") + f"*{exc.user_message}*"
        if not note and not out.text.strip():
            note = EMPTY_ANSWER
        await out.finish(note)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(ChannelCommands(bot))
