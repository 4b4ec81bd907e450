"""Access lists: the precedence (deny wins, non-empty allow lists required), the cached service,
who may change settings and personas, and server defaults under channel settings."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from bot.access import AccessRules, AccessService, Effect, Kind
from bot.service import ChatService
from bot.storage import repo
from bot.storage.db import Database
from bot.storage.models import AuditEntry, Editors

CHANNEL, THREAD, OTHER = 100, 101, 102
ALICE, BOB = 1, 2
MODS, MUTED = 50, 51


def rules(*entries: tuple[str, int, str]) -> AccessRules:
    return AccessRules.from_entries(entries)


def allows(r: AccessRules, user: int = ALICE, roles=(), channels=(CHANNEL,)) -> bool:
    return r.allows(channel_ids=channels, user_id=user, role_ids=roles)


def test_empty_lists_allow_everyone_everywhere():
    assert allows(rules())
    assert allows(rules(), user=BOB, channels=(OTHER,))


def test_a_deny_refuses_and_beats_every_allow():
    assert not allows(rules(("channel", CHANNEL, "deny")))
    assert allows(rules(("channel", CHANNEL, "deny")), channels=(OTHER,))
    assert not allows(rules(("user", ALICE, "deny")))
    assert allows(rules(("user", ALICE, "deny")), user=BOB)
    assert not allows(rules(("role", MUTED, "deny")), roles=(MODS, MUTED))
    # deny beats allow, whatever the kinds
    assert not allows(rules(("user", ALICE, "allow"), ("role", MUTED, "deny")), roles=(MUTED,))
    assert not allows(rules(("channel", CHANNEL, "allow"), ("user", ALICE, "deny")))
    assert not allows(rules(("role", MODS, "allow"), ("user", ALICE, "deny")), roles=(MODS,))


def test_a_non_empty_allow_list_is_required():
    only_here = rules(("channel", CHANNEL, "allow"))
    assert allows(only_here) and not allows(only_here, channels=(OTHER,))
    # users and roles form one list: the user, or one of their roles, must be on it
    who = rules(("user", BOB, "allow"), ("role", MODS, "allow"))
    assert allows(who, user=BOB)
    assert allows(who, user=ALICE, roles=(MODS,))
    assert not allows(who, user=ALICE, roles=(MUTED,))
    # both dimensions must pass
    both = rules(("channel", CHANNEL, "allow"), ("user", BOB, "allow"))
    assert allows(both, user=BOB) and not allows(both, user=BOB, channels=(OTHER,))
    assert not allows(both, user=ALICE)


def test_a_thread_follows_its_parent_channel():
    parent_denied = rules(("channel", CHANNEL, "deny"))
    assert not allows(parent_denied, channels=(THREAD, CHANNEL))
    parent_allowed = rules(("channel", CHANNEL, "allow"))
    assert allows(parent_allowed, channels=(THREAD, CHANNEL))
    assert not allows(parent_allowed, channels=(THREAD, OTHER))


def test_bad_entries_are_refused():
    with pytest.raises(ValueError):
        rules(("server", 1, "allow"))
    with pytest.raises(ValueError):
        rules(("user", 1, "maybe"))


async def test_the_service_reads_the_lists_per_guild_and_changes_apply_at_once(db: Database):
    access = AccessService(db)
    assert await access.allows(7, channel_ids=[CHANNEL], user_id=ALICE)
    await access.set_rule(7, Kind.USER, ALICE, Effect.DENY, actor_id=BOB)
    assert not await access.allows(7, channel_ids=[CHANNEL], user_id=ALICE)
    assert await access.allows(8, channel_ids=[CHANNEL], user_id=ALICE)  # another guild
    await access.set_rule(7, Kind.USER, ALICE, Effect.ALLOW, actor_id=BOB)  # replaces the deny
    assert await access.allows(7, channel_ids=[CHANNEL], user_id=ALICE)
    assert not await access.allows(7, channel_ids=[CHANNEL], user_id=BOB)
    assert await access.remove_rule(7, Kind.USER, ALICE, actor_id=BOB)
    assert not await access.remove_rule(7, Kind.USER, ALICE, actor_id=BOB)
    assert await access.allows(7, channel_ids=[CHANNEL], user_id=BOB)
    await access.set_rule(7, Kind.CHANNEL, OTHER, Effect.DENY, actor_id=BOB)
    await access.set_rule(7, Kind.ROLE, MUTED, Effect.DENY, actor_id=BOB)
    assert await access.clear(7, actor_id=BOB) == 2
    assert await access.allows(7, channel_ids=[OTHER], user_id=ALICE, role_ids=[MUTED])
    assert await access.allows(None, channel_ids=[OTHER], user_id=ALICE)  # DMs
    fresh = AccessService(db)  # what was stored, read back
    await fresh.set_rule(7, Kind.ROLE, MUTED, Effect.DENY, actor_id=BOB)
    assert not await AccessService(db).allows(7, channel_ids=[1], user_id=3, role_ids=[MUTED])
    async with db.session() as s:
        entries = await s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()))
        actions = [e.action for e in entries]
    assert actions[:3] == ["access.deny", "access.clear", "access.deny"]


async def test_editors_default_and_change(db: Database):
    access = AccessService(db)
    editing = await access.editing(7)
    assert (editing.settings, editing.persona) == (Editors.EVERYONE, Editors.MANAGERS)
    changed = await access.set_editing(7, ALICE, settings=Editors.MANAGERS)
    assert (changed.settings, changed.persona) == (Editors.MANAGERS, Editors.MANAGERS)
    await access.set_editing(7, ALICE, persona=Editors.EVERYONE)
    again = await AccessService(db).editing(7)
    assert (again.settings, again.persona) == (Editors.MANAGERS, Editors.EVERYONE)
    assert (await access.editing(8)).settings == Editors.EVERYONE


async def test_server_defaults_sit_between_the_model_and_the_channel(service: ChatService, engine):
    async with service.db.session() as s, s.begin():
        await repo.ensure_channel(s, CHANNEL, 7)
        await repo.ensure_channel(s, OTHER, 8)
    await service.update_server_settings(7, ALICE, temperature=0.2, top_k=5)
    await service.update_settings(CHANNEL, ALICE, top_k=9)
    here = await service.get_settings(CHANNEL)
    assert (here.temperature, here.top_k) == (0.2, 9)
    assert here.overridden == {"top_k"} and here.from_server == {"temperature", "top_k"}
    lines = here.describe()
    assert "temperature = 0.2 (server default)" in lines and "top_k = 9 (set here)" in lines
    elsewhere = await service.get_settings(OTHER)  # another server: the model's defaults
    assert elsewhere.temperature == 0.7 and not elsewhere.from_server
    # generation uses the same layers
    async with service.db.session() as s:
        merged = await repo.settings_overrides(s, CHANNEL)
    assert (merged["temperature"], merged["top_k"], merged["top_p"]) == (0.2, 9, None)
    server = await service.reset_server_settings(7, ALICE)
    assert server.overridden == frozenset()
    assert (await service.get_settings(CHANNEL)).temperature == 0.7
