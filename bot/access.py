"""Who may talk to the bot and where (per-server allow/deny lists), and who may change settings.

Precedence, for a message in a server (DMs are governed by REPLY_IN_DMS alone):

1. A deny always wins: the channel (or, in a thread, its parent channel), the user, or any of
   the user's roles on a deny list -> refused.
2. An allow list, when non-empty, is required: if any channel is allowed, the channel (or the
   thread's parent) must be one of them; if any user or role is allowed, the user must be
   allowed or have an allowed role (users and roles form one "who" list).
3. Otherwise the message is allowed (empty lists: everyone, everywhere).

A refused message is ignored silently: nothing is stored, nothing is generated.
Managers are not exempt; the lists govern chatting only, never the slash commands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from bot.storage import repo
from bot.storage.models import Editors

if TYPE_CHECKING:
    from bot.storage.db import Database


class Kind(StrEnum):
    CHANNEL = "channel"
    ROLE = "role"
    USER = "user"


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class AccessRules:
    """A server's allow and deny lists, as sets of ids per kind."""

    allow: dict[Kind, frozenset[int]] = field(default_factory=dict)
    deny: dict[Kind, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, int, str]]) -> AccessRules:
        """From (kind, target id, effect) triples."""
        lists: dict[Effect, dict[Kind, set[int]]] = {Effect.ALLOW: {}, Effect.DENY: {}}
        for kind, target, effect in entries:
            lists[Effect(effect)].setdefault(Kind(kind), set()).add(int(target))
        allow, deny = ({k: frozenset(v) for k, v in lists[e].items()} for e in Effect)
        return cls(allow=allow, deny=deny)

    def _ids(self, effect: Effect, kind: Kind) -> frozenset[int]:
        return (self.allow if effect is Effect.ALLOW else self.deny).get(kind, frozenset())

    def allows(
        self, *, channel_ids: Iterable[int], user_id: int, role_ids: Iterable[int] = ()
    ) -> bool:
        """The precedence of the module docstring. `channel_ids`: the channel and, for a
        thread, its parent (a match on either counts)."""
        channels, roles = set(channel_ids), set(role_ids)
        if channels & self._ids(Effect.DENY, Kind.CHANNEL):
            return False
        if user_id in self._ids(Effect.DENY, Kind.USER) or roles & self._ids(
            Effect.DENY, Kind.ROLE
        ):
            return False
        allowed_channels = self._ids(Effect.ALLOW, Kind.CHANNEL)
        if allowed_channels and not channels & allowed_channels:
            return False
        users, allowed_roles = (
            self._ids(Effect.ALLOW, Kind.USER),
            self._ids(Effect.ALLOW, Kind.ROLE),
        )
        listed = bool(users or allowed_roles)
        return not listed or user_id in users or bool(roles & allowed_roles)

    def describe(self) -> list[str]:
        """One line per list, for /access show (ids as Discord mentions, which ping no one in
        an ephemeral message sent without allowed mentions)."""
        shown = {Kind.CHANNEL: "<#{}>", Kind.ROLE: "<@&{}>", Kind.USER: "<@{}>"}
        lines = []
        for effect in Effect:
            for kind in Kind:
                ids = sorted(self._ids(effect, kind))
                if ids:
                    names = ", ".join(shown[kind].format(i) for i in ids)
                    lines.append(f"{effect.value} {kind.value}s: {names}")
        return lines or ["no lists: everyone may talk to the bot in every channel"]


@dataclass(frozen=True)
class Editing:
    """Who may change a server's generation settings and its channels' personas."""

    settings: Editors = Editors.EVERYONE
    persona: Editors = Editors.MANAGERS


class AccessService:
    """Access lists and editors per server, read from the database on every use: a change made
    through any process (another shard) applies at once everywhere."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def rules(self, guild_id: int) -> AccessRules:
        async with self.db.session() as s:
            rows = await repo.access_rules(s, guild_id)
        return AccessRules.from_entries((r.kind, r.target_id, r.effect) for r in rows)

    async def allows(
        self,
        guild_id: int | None,
        *,
        channel_ids: Iterable[int],
        user_id: int,
        role_ids: Iterable[int] = (),
    ) -> bool:
        """May this user talk to the bot here? Always in DMs (guild_id None)."""
        if guild_id is None:
            return True
        rules = await self.rules(guild_id)
        return rules.allows(channel_ids=channel_ids, user_id=user_id, role_ids=role_ids)

    async def set_rule(
        self, guild_id: int, kind: Kind, target_id: int, effect: Effect, actor_id: int
    ) -> None:
        async with self.db.session() as s, s.begin():
            await repo.set_access_rule(s, guild_id, kind, target_id, effect, actor_id)
            await repo.add_audit(
                s, actor_id, f"access.{effect.value}", f"guild {guild_id}: {kind.value} {target_id}"
            )

    async def remove_rule(self, guild_id: int, kind: Kind, target_id: int, actor_id: int) -> bool:
        async with self.db.session() as s, s.begin():
            removed = await repo.remove_access_rule(s, guild_id, kind, target_id)
            if removed:
                await repo.add_audit(
                    s, actor_id, "access.remove", f"guild {guild_id}: {kind.value} {target_id}"
                )
        return removed

    async def clear(self, guild_id: int, actor_id: int) -> int:
        async with self.db.session() as s, s.begin():
            count = await repo.clear_access_rules(s, guild_id)
            await repo.add_audit(s, actor_id, "access.clear", f"guild {guild_id}: {count} entries")
        return count

    # -- who may change settings and personas --
    async def editing(self, guild_id: int) -> Editing:
        async with self.db.session() as s:
            row = await repo.guild_settings(s, guild_id)
        if row is None:
            return Editing()
        return Editing(Editors(row.settings_editors), Editors(row.persona_editors))

    async def set_editing(
        self,
        guild_id: int,
        actor_id: int,
        *,
        settings: Editors | None = None,
        persona: Editors | None = None,
    ) -> Editing:
        async with self.db.session() as s, s.begin():
            row = await repo.set_editors(s, guild_id, actor_id, settings=settings, persona=persona)
            editing = Editing(Editors(row.settings_editors), Editors(row.persona_editors))
            await repo.add_audit(
                s,
                actor_id,
                "access.editors",
                f"guild {guild_id}: settings {editing.settings}, persona {editing.persona}",
            )
        return editing
