"""Server-side permission checks for app commands: admins and message managers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import discord
from discord import app_commands

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


def admin_only() -> Callable[[T], T]:
    """Command decorator: Administrator by default on Discord, checked again on our side."""

    def predicate(interaction: discord.Interaction) -> bool:
        if not is_admin(interaction.user, _admin_ids(interaction), _resolved(interaction)):
            raise NotAllowed("This command is for server administrators only.")
        return True

    def decorator(func: Any) -> Any:
        func = app_commands.default_permissions(administrator=True)(func)
        return app_commands.check(predicate)(func)

    return decorator


def managers_only() -> Callable[[T], T]:
    """Command decorator: Manage Messages or admin."""

    def predicate(interaction: discord.Interaction) -> bool:
        if not can_manage(interaction.user, _admin_ids(interaction), _resolved(interaction)):
            raise NotAllowed("You need the Manage Messages permission for this command.")
        return True

    def decorator(func: Any) -> Any:
        func = app_commands.default_permissions(manage_messages=True)(func)
        return app_commands.check(predicate)(func)

    return decorator
