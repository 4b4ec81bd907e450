"""Storage: round trips, SQLite pragmas, restarts, interrupted replies, PostgreSQL DDL."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

from bot.storage import repo
from bot.storage.db import Database, DatabaseError
from bot.storage.models import AuditEntry, Base, Channel, Message, Role, Status


async def test_sqlite_connections_use_wal_and_foreign_keys(db: Database):
    async with db.session() as s:
        assert (await s.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await s.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    with pytest.raises(IntegrityError):
        async with db.session() as s, s.begin():
            await repo.add_message(s, channel_id=404, role="user", content="no such channel")


async def test_message_round_trip_keeps_every_field(db: Database):
    big = 1_234_567_890_123_456_789  # Discord ids need 64 bits
    async with db.session() as s, s.begin():
        await repo.ensure_channel(s, big, guild_id=big - 1)
        row = await repo.add_message(
            s,
            channel_id=big,
            discord_message_id=big + 1,
            author_id=big + 3,
            author_name="Zoë",
            role=Role.ASSISTANT,
            content="héllo 🙂",
            prompt_tokens=40,
            model_version="tiny@2",
            status=Status.IN_PROGRESS,
        )
        await repo.update_message(
            s,
            row.id,
            discord_message_ids=[big + 1, big + 2],
            token_count=5,
            queue_ms=1.5,
            ttft_ms=20.0,
            tokens_per_s=33.3,
            duration_ms=99.0,
            finish_reason="stop",
            status=Status.COMPLETE,
        )
        row_id = row.id
    async with db.session() as s:
        stored = await s.get(Message, row_id)
        channel = await s.get(Channel, big)
    assert channel.guild_id == big - 1 and channel.autoreply is False
    assert stored.discord_message_id == big + 1 and stored.discord_message_ids == [big + 1, big + 2]
    assert (stored.author_id, stored.author_name, stored.content) == (big + 3, "Zoë", "héllo 🙂")
    assert (stored.token_count, stored.prompt_tokens, stored.model_version) == (5, 40, "tiny@2")
    assert (stored.queue_ms, stored.ttft_ms, stored.tokens_per_s) == (1.5, 20.0, 33.3)
    assert stored.finish_reason == "stop" and stored.status is Status.COMPLETE
    assert stored.role is Role.ASSISTANT  # the enums come back, stored as their values
    assert stored.created_at.tzinfo == UTC and not stored.forgotten  # aware, on SQLite too
    assert abs(datetime.now(UTC) - stored.created_at) < timedelta(minutes=5)


async def test_check_constraints_refuse_unknown_roles(db: Database):
    with pytest.raises(IntegrityError):
        async with db.session() as s, s.begin():
            await repo.ensure_channel(s, 1)
            await repo.add_message(s, channel_id=1, role="narrator", content="x")


async def test_ensure_channel_is_idempotent_under_concurrency(db: Database):
    async def create() -> None:
        async with db.session() as s, s.begin():
            await repo.ensure_channel(s, 77, guild_id=5)

    await asyncio.gather(*(create() for _ in range(8)))
    async with db.session() as s:
        assert (await s.scalars(select(Channel))).all()[0].guild_id == 5
        assert len((await s.scalars(select(Channel))).all()) == 1


async def test_settings_overrides_round_trip_and_clear(db: Database):
    async with db.session() as s, s.begin():
        await repo.ensure_channel(s, 3)
        await repo.set_overrides(s, 3, 42, {"temperature": 0.2, "top_k": 9})
    async with db.session() as s:
        values = await repo.settings_overrides(s, 3)
    assert values["temperature"] == 0.2 and values["top_k"] == 9 and values["top_p"] is None
    async with db.session() as s, s.begin():
        await repo.clear_overrides(s, 3, 42)
    async with db.session() as s:
        assert set((await repo.settings_overrides(s, 3)).values()) == {None}


async def test_history_survives_a_restart(db_url: str):
    first = await Database.open(db_url)
    async with first.session() as s, s.begin():
        await repo.ensure_channel(s, 10)
        for i in range(5):
            await repo.add_message(s, channel_id=10, role="user", content=f"turn {i}", author_id=1)
        await repo.add_audit(s, 1, "persona.set", "channel 10")
    await first.close()

    second = await Database.open(db_url)
    async with second.session() as s:
        turns = await repo.history(s, 10, limit=3)
        audit = (await s.scalars(select(AuditEntry))).all()
    await second.close()
    assert [t.content for t in turns] == ["turn 2", "turn 3", "turn 4"]
    assert [(a.actor_id, a.action) for a in audit] == [(1, "persona.set")]


async def test_replies_left_in_progress_are_marked_interrupted_at_start(db_url: str):
    first = await Database.open(db_url)
    async with first.session() as s, s.begin():
        await repo.ensure_channel(s, 10)
        done = await repo.add_message(s, channel_id=10, role="assistant", content="whole")
        partial = await repo.add_message(
            s, channel_id=10, role="assistant", content="half a sen", status=Status.IN_PROGRESS
        )
        ids = done.id, partial.id
    async with first.session() as s:
        assert [m.content for m in await repo.history(s, 10, 10)] == [
            "whole"
        ]  # in progress: hidden
    await first.close()  # the "crash": nobody finished the reply

    second = await Database.open(db_url)
    async with second.session() as s:
        rows = {m.id: m for m in (await s.scalars(select(Message))).all()}
        assert [m.content for m in await repo.history(s, 10, 10)] == ["whole", "half a sen"]
    assert await second.mark_interrupted() == 0  # already done by open()
    await second.close()
    assert rows[ids[0]].status == "complete"
    assert rows[ids[1]].status == "interrupted" and rows[ids[1]].content == "half a sen"


async def test_forget_keeps_rows_but_hides_them(db: Database):
    async with db.session() as s, s.begin():
        await repo.ensure_channel(s, 8)
        for i in range(3):
            await repo.add_message(s, channel_id=8, role="user", content=f"m{i}")
    async with db.session() as s, s.begin():
        assert await repo.forget(s, 8) == 3
        assert await repo.forget(s, 8) == 0
    async with db.session() as s:
        assert await repo.history(s, 8, 10) == []
        assert len(await repo.history(s, 8, 10, include_forgotten=True)) == 3
        assert await s.scalar(select(func.count()).where(Message.channel_id == 8)) == 3


def test_bad_url_is_a_one_line_error():
    with pytest.raises(DatabaseError, match="invalid database URL"):
        Database("not a url")


def test_schema_compiles_for_postgresql():
    """The same models on PostgreSQL: BIGINT ids, JSON, booleans, named constraints."""
    dialect = postgresql.dialect()
    ddl = "\n".join(
        str(CreateTable(t).compile(dialect=dialect)) for t in Base.metadata.sorted_tables
    )
    indexes = [
        str(CreateIndex(i).compile(dialect=dialect))
        for t in Base.metadata.tables.values()
        for i in t.indexes
    ]
    assert "id BIGSERIAL NOT NULL" in ddl  # messages and audit_log autoincrement as BIGINT
    assert "discord_message_ids JSON NOT NULL" in ddl
    assert "autoreply BOOLEAN DEFAULT false NOT NULL" in ddl
    assert "CONSTRAINT fk_messages_channel_id_channels FOREIGN KEY" in ddl
    assert any("ix_messages_channel_history" in i for i in indexes)


async def test_a_sqlite_transaction_takes_the_write_lock_at_begin(db: Database):
    """A transaction that reads and then writes must hold SQLite's write lock from BEGIN.
    Deferred, its read snapshot cannot be upgraded once another connection has committed, and
    SQLite says "database is locked" at once, whatever busy_timeout says: twenty mentions at once
    lost messages so. Checked from a second connection that may not wait for the lock."""
    path = db.engine.url.database
    async with db.session() as s, s.begin():
        await s.execute(select(func.count()).select_from(Channel))  # a read first
        other = sqlite3.connect(path, timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
        await repo.ensure_channel(s, 100, 5)

    async def accept(channel: int) -> None:  # reads, then writes, all at once
        async with db.session() as s, s.begin():
            await s.execute(select(func.count()).select_from(Channel))
            await asyncio.sleep(0)
            await repo.ensure_channel(s, channel, 5)

    await asyncio.gather(*(accept(200 + i) for i in range(20)))
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Channel)) == 21
