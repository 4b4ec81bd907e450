"""Unit tests of the server-side permission checks (bot/cogs/checks.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import discord

from bot.cogs.checks import can_manage, is_admin


@dataclass
class _User:
    id: int
    guild_permissions: discord.Permissions = field(default_factory=discord.Permissions.none)


def test_plain_member_is_not_admin() -> None:
    assert not is_admin(_User(1), [])  # type: ignore[arg-type]
    assert not can_manage(_User(1), [])  # type: ignore[arg-type]


def test_admin_permission_or_listed_id() -> None:
    assert is_admin(_User(1, discord.Permissions(administrator=True)), [])  # type: ignore[arg-type]
    assert is_admin(_User(7), [7])  # type: ignore[arg-type]
    assert not is_admin(_User(8), [7])  # type: ignore[arg-type]


def test_manage_messages_can_manage_but_is_not_admin() -> None:
    mod = _User(2, discord.Permissions(manage_messages=True))
    assert can_manage(mod, [])  # type: ignore[arg-type]
    assert not is_admin(mod, [])  # type: ignore[arg-type]


def test_permissions_resolved_for_the_interaction_count_too() -> None:
    user = SimpleNamespace(id=5)  # no cached roles: only what Discord resolved for the interaction
    assert is_admin(user, [], discord.Permissions(administrator=True))  # type: ignore[arg-type]
    assert not is_admin(user, [], discord.Permissions(manage_messages=True))  # type: ignore[arg-type]
    assert can_manage(user, [], discord.Permissions(manage_messages=True))  # type: ignore[arg-type]
    assert not can_manage(user, [], discord.Permissions.none())  # type: ignore[arg-type]


def test_manage_messages_in_one_channel_is_not_server_wide() -> None:
    """Discord resolves the permissions of the channel where a command is typed: Manage
    Messages granted there by an overwrite must not pass a server-wide check."""
    member = _User(3)  # no Manage Messages from the roles
    in_random = discord.Permissions(manage_messages=True)  # an overwrite of #random
    assert can_manage(member, [], in_random)  # type: ignore[arg-type]  # this channel: yes
    assert not can_manage(member, [], in_random, server_wide=True)  # type: ignore[arg-type]
    mod = _User(4, discord.Permissions(manage_messages=True))
    assert can_manage(mod, [], discord.Permissions.none(), server_wide=True)  # type: ignore[arg-type]
    # in a channel whose overwrite takes it away, the channel's resolution wins
    assert not can_manage(mod, [], discord.Permissions.none())  # type: ignore[arg-type]
    admin = _User(5, discord.Permissions(administrator=True))
    assert can_manage(admin, [], discord.Permissions.none(), server_wide=True)  # type: ignore[arg-type]
