"""Server-side permission checks for app commands: admins, message managers, and editors (who
may change settings and personas: a per-server choice, see bot/access.py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import discord
from discord import app_commands

from bot.storage.models import Editors

T = TypeVar("T")


class NotAllowed(app_commands.CheckFailure):
    """Raised when a member lacks the rights for a command; str() is the user-facing line."""


def _has(
    user: discord.abc.User,
    resolved: discord.Permissions | None,
    name: str,
    *,
    server_wide: bool = False,
) -> bool:
    """A permission at the scope of the action. `server_wide`: from the member's roles across
    the server (`guild_permissions`), since Manage Messages in one channel must not reach the
    whole server. Else in the channel of the interaction: the permissions Discord resolved there
    (`resolved`, with the channel's overwrites), or the member's roles when Discord sent none."""
    perms = getattr(user, "guild_permissions", None)
    scoped = perms if server_wide or resolved is None else resolved
    return bool(scoped is not None and getattr(scoped, name))


def is_admin(
    user: discord.abc.User,
    admin_ids: Iterable[int],
    resolved: discord.Permissions | None = None,
) -> bool:
    """True for ADMIN_USER_IDS and for guild members with the Administrator permission (from
    their roles, or as Discord resolved it for the interaction: a server-wide permission that
    a channel's overwrites neither give nor take)."""
    return (
        user.id in set(admin_ids)
        or _has(user, None, "administrator", server_wide=True)
        or bool(resolved is not None and resolved.administrator)
    )


def can_manage(
    user: discord.abc.User,
    admin_ids: Iterable[int],
    resolved: discord.Permissions | None = None,
    *,
    server_wide: bool = False,
) -> bool:
    """True for admins and for members with Manage Messages: in the interaction's channel
    (`resolved`), or across the server when the action is (`server_wide`)."""
    return is_admin(user, admin_ids, resolved) or _has(
        user, resolved, "manage_messages", server_wide=server_wide
    )


def _admin_ids(interaction: discord.Interaction) -> list[int]:
    settings = getattr(interaction.client, "settings", None)
    return list(getattr(settings, "admin_user_ids", []) or [])


def _resolved(interaction: discord.Interaction) -> discord.Permissions | None:
    """The member's permissions in the channel as Discord resolved them (None outside guilds)."""
    return interaction.permissions if interaction.guild_id is not None else None


def _require(
    allowed: Callable[..., bool], refusal: str, *, owner_in_dm: bool = False, **default: bool
) -> Callable[[T], T]:
    """A command decorator: `allowed(user, admin_ids, resolved)` checked on our side for every
    call, and `default` as the permissions Discord asks for by default. Discord applies those to
    top-level commands only (discord.py sends none for a subcommand), so for subcommands the
    check here is the whole protection. `owner_in_dm`: in a direct message with the bot the user
    owns the conversation and passes."""

    def predicate(interaction: discord.Interaction) -> bool:
        if owner_in_dm and interaction.guild_id is None:
            return True
        if not allowed(interaction.user, _admin_ids(interaction), _resolved(interaction)):
            raise NotAllowed(refusal)
        return True

    def decorator(func: Any) -> Any:
        func = app_commands.default_permissions(**default)(func)
        return app_commands.check(predicate)(func)

    return decorator


def admin_only() -> Callable[[T], T]:
    """Server administrators (and ADMIN_USER_IDS) only."""
    return _require(is_admin, "This command is for server administrators only.", administrator=True)


def managers_only(*, server_wide: bool = False) -> Callable[[T], T]:
    """Members with Manage Messages (in this channel; `server_wide`: across the server, for
    actions on the whole server), and admins; in a DM with the bot, the user."""

    def allowed(user: discord.abc.User, admin_ids: Iterable[int], resolved: Any) -> bool:
        return can_manage(user, admin_ids, resolved, server_wide=server_wide)

    return _require(
        allowed,
        "You need the Manage Messages permission"
        + (" across the server" if server_wide else "")
        + " for this command.",
        owner_in_dm=True,
        manage_messages=True,
    )


def require_manager(
    interaction: discord.Interaction, refusal: str, *, server_wide: bool = False
) -> None:
    """Inside a command: NotAllowed(refusal) unless the user is a manager (or in a DM);
    `server_wide`: Manage Messages across the server, for an action on the whole server."""
    if interaction.guild_id is None:
        return
    admins, resolved = _admin_ids(interaction), _resolved(interaction)
    if not can_manage(interaction.user, admins, resolved, server_wide=server_wide):
        raise NotAllowed(refusal)


def _chat(interaction: discord.Interaction) -> Any:
    """The bot's ChatService; NotAllowed while the bot is still starting."""
    return _chat_service(interaction.client)


def editors_only(what: Literal["settings", "persona"]) -> Callable[[T], T]:
    """Whoever the server lets change its `what` (`/access editors`): everyone, or managers
    only; the defaults are everyone for settings and managers for personas. In a DM, the user.
    Discord's default permissions (shown in the README) follow the defaults."""

    async def predicate(interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            return True
        chat = _chat(interaction)
        editing = await chat.access.editing(interaction.guild_id)
        if getattr(editing, what) == Editors.EVERYONE:
            return True
        require_manager(
            interaction,
            f"On this server, changing the {what} needs the Manage Messages permission.",
        )
        return True

    def decorator(func: Any) -> Any:
        if what == "persona":
            func = app_commands.default_permissions(manage_messages=True)(func)
        return app_commands.check(predicate)(func)

    return decorator


NOT_HERE = "This server's access lists don't let you talk to the bot here."
OPTED_OUT = (
    "You opted out of storing your messages, so I keep no conversation with you to take up "
    "again (`/privacy opt-in` to change that)."
)


@dataclass(frozen=True)
class Refusal:
    """Why a request to generate is refused: the line to show, and whether the access lists
    refused it (a message is then ignored without a word; a command or button press is told)."""

    text: str
    by_access: bool = False


async def refusal(
    bot: Any,
    *,
    guild_id: int | None,
    channel: Any,
    user: discord.abc.User,
    stores: bool = False,
    count: bool = True,
) -> Refusal | None:
    """The one gate of every path that makes the bot generate (a message, a reply button,
    /ask): None when `user` may, else why not. In order: the server's access lists (in a
    thread its parent channel's entries count too; DMs always pass); the user's opt-out when
    what is generated is stored into a conversation of theirs (`stores`: regenerate, continue;
    a message of an opted-out user is answered but stored nowhere, see ChatService.reply); then
    the rate limits per user and per channel, where the request counts (`count`; a refusal
    never counts)."""
    channel_id = getattr(channel, "id", None)
    if guild_id is not None:
        channel_ids = [channel_id] if channel_id is not None else []
        parent_id = getattr(channel, "parent_id", None)
        if parent_id is not None:  # a thread: its parent channel's entries count too
            channel_ids.append(parent_id)
        roles = [role.id for role in getattr(user, "roles", [])]
        chat = _chat_service(bot)
        if not await chat.access.allows(
            guild_id, channel_ids=channel_ids, user_id=user.id, role_ids=roles
        ):
            return Refusal(NOT_HERE, by_access=True)
    if stores and await _chat_service(bot).privacy.opted_out(user.id):
        return Refusal(OPTED_OUT)
    if not count:
        return None
    cog = bot.get_cog("Chat")
    if cog is None:  # the rate limits live there; never generate around them
        raise RuntimeError("the chat cog (which holds the rate limits) is not loaded")
    refused = cog.limits.check(user.id, channel_id)
    if inspect.isawaitable(refused):  # the limits in Redis
        refused = await refused
    return Refusal(refused) if refused else None


def _chat_service(bot: Any) -> Any:
    chat = getattr(bot, "chat", None)
    if chat is None:
        raise NotAllowed("The bot is still starting; try again in a moment.")
    return chat


def talkers_only() -> Callable[[T], T]:
    """Whoever may make the bot generate here now (`refusal`: access lists, rate limits); in a
    DM, the user. For commands that generate, like /ask."""

    async def predicate(interaction: discord.Interaction) -> bool:
        refused = await refusal(
            interaction.client,
            guild_id=interaction.guild_id,
            channel=interaction.channel,
            user=interaction.user,
        )
        if refused is not None:
            raise NotAllowed(refused.text)
        return True

    return app_commands.check(predicate)
