"""Server-side permission checks for app commands: admins, message managers, and editors (who
may change settings and personas: a per-server choice, see bot/access.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import discord
from discord import app_commands

from bot.storage.models import Editors

T = TypeVar("T")


class NotAllowed(app_commands.CheckFailure):
    """Raised when a member lacks the rights for a command; str() is the user-facing line."""


def _has(user: discord.abc.User, resolved: discord.Permissions | None, name: str) -> bool:
    """A permission from the member's roles, or from the interaction's resolved permissions."""
    perms = getattr(user, "guild_permissions", None)
    return bool(
        (perms is not None and getattr(perms, name))
        or (resolved is not None and getattr(resolved, name))
    )


def is_admin(
    user: discord.abc.User,
    admin_ids: Iterable[int],
    resolved: discord.Permissions | None = None,
) -> bool:
    """True for ADMIN_USER_IDS and for guild members with the Administrator permission
    (`resolved`: the permissions Discord sent with the interaction, if any)."""
    return user.id in set(admin_ids) or _has(user, resolved, "administrator")


def can_manage(
    user: discord.abc.User,
    admin_ids: Iterable[int],
    resolved: discord.Permissions | None = None,
) -> bool:
    """True for admins and for members with Manage Messages."""
    return is_admin(user, admin_ids, resolved) or _has(user, resolved, "manage_messages")


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


def managers_only() -> Callable[[T], T]:
    """Members with Manage Messages, and admins; in a DM with the bot, the user."""
    return _require(
        can_manage,
        "You need the Manage Messages permission for this command.",
        owner_in_dm=True,
        manage_messages=True,
    )


def require_manager(interaction: discord.Interaction, refusal: str) -> None:
    """Inside a command: NotAllowed(refusal) unless the user is a manager (or in a DM)."""
    if interaction.guild_id is None:
        return
    if not can_manage(interaction.user, _admin_ids(interaction), _resolved(interaction)):
        raise NotAllowed(refusal)


def _chat(interaction: discord.Interaction) -> Any:
    """The bot's ChatService; NotAllowed while the bot is still starting."""
    chat = getattr(interaction.client, "chat", None)
    if chat is None:
        raise NotAllowed("The bot is still starting; try again in a moment.")
    return chat


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


def talkers_only() -> Callable[[T], T]:
    """Whoever the server's access lists (bot/access.py) let talk to the bot in this channel;
    in a DM, the user. For commands that generate, like /ask."""

    async def predicate(interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            return True
        chat = _chat(interaction)
        channel_ids = [interaction.channel_id] if interaction.channel_id is not None else []
        parent_id = getattr(interaction.channel, "parent_id", None)
        if parent_id is not None:
            channel_ids.append(parent_id)
        roles = [role.id for role in getattr(interaction.user, "roles", [])]
        if not await chat.access.allows(
            interaction.guild_id,
            channel_ids=channel_ids,
            user_id=interaction.user.id,
            role_ids=roles,
        ):
            raise NotAllowed("This server's access lists don't let you talk to the bot here.")
        return True

    return app_commands.check(predicate)
