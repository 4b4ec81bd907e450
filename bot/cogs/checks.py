"""Server-side permission checks for app commands: admins and message managers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import discord
from discord import app_commands

T = TypeVar("T")


class NotAllowed(app_commands.CheckFailure):
    """Raised when a member lacks the rights for a command; str() is the user-facing line."""


def is_admin(user: discord.abc.User, admin_ids: Iterable[int]) -> bool:
    """True for ADMIN_USER_IDS and for guild members with the Administrator permission."""
    if user.id in set(admin_ids):
        return True
    perms = getattr(user, "guild_permissions", None)
    return bool(perms is not None and perms.administrator)


def can_manage(user: discord.abc.User, admin_ids: Iterable[int]) -> bool:
    """True for admins and for members with Manage Messages."""
    perms = getattr(user, "guild_permissions", None)
    return is_admin(user, admin_ids) or bool(perms is not None and perms.manage_messages)


def _admin_ids(interaction: discord.Interaction) -> list[int]:
    settings = getattr(interaction.client, "settings", None)
    return list(getattr(settings, "admin_user_ids", []) or [])


def admin_only() -> Callable[[T], T]:
    """Command decorator: Administrator by default on Discord, checked again on our side."""

    def predicate(interaction: discord.Interaction) -> bool:
        if not is_admin(interaction.user, _admin_ids(interaction)):
            raise NotAllowed("This command is for server administrators only.")
        return True

    def decorator(func: Any) -> Any:
        func = app_commands.default_permissions(administrator=True)(func)
        return app_commands.check(predicate)(func)

    return decorator


def managers_only() -> Callable[[T], T]:
    """Command decorator: Manage Messages or admin."""

    def predicate(interaction: discord.Interaction) -> bool:
        if not can_manage(interaction.user, _admin_ids(interaction)):
            raise NotAllowed("You need the Manage Messages permission for this command.")
        return True

    def decorator(func: Any) -> Any:
        func = app_commands.default_permissions(manage_messages=True)(func)
        return app_commands.check(predicate)(func)

    return decorator
