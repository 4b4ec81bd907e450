"""The same storage and conversation code on PostgreSQL; runs when BOT_TEST_POSTGRES_URL is set.

Example: BOT_TEST_POSTGRES_URL=postgresql+asyncpg://bot:bot@localhost/bot_test (the database is
emptied: every table is dropped by a downgrade to base before and after each test).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from bot.generation import SettingsError
from bot.service import ChatService
from bot.storage import repo
from bot.storage.db import Database
from bot.storage.migrate import head_revisions, run_command
from bot.storage.models import Base, Message, Status
from bot.turns import IncomingMessage, Speaker
from tests.bot_core.fakes import FakeEngine

URL = os.environ.get("BOT_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="BOT_TEST_POSTGRES_URL not set")

BOT = Speaker(900, "Bot", is_bot=True)
BIG = 1_234_567_890_123_456_789


@pytest.fixture
async def pg():
    db = Database(URL)
    await run_command(db.engine, "downgrade", "base")
    await db.close()
    db = await Database.open(URL)
    yield db
    await run_command(db.engine, "downgrade", "base")
    await db.close()


async def test_migrated_schema_matches_the_orm(pg: Database):
    async with pg.engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        diff = await conn.run_sync(
            lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
            )
        )
    assert {"channels", "messages", "channel_settings", "audit_log"} <= tables
    assert diff == []


async def test_processes_starting_together_migrate_one_after_the_other():
    """Shards and workers started at once each migrate a new database at start-up. Alembic
    takes no lock: side by side, both ran the first migration (duplicate tables, or a duplicate
    alembic_version row). With the advisory lock the second waits and finds nothing to do."""
    db = Database(URL)
    await run_command(db.engine, "downgrade", "base")
    others = [Database(URL) for _ in range(3)]
    try:
        await asyncio.gather(*(run_command(d.engine, "upgrade", "head") for d in [db, *others]))
        async with db.engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert [v for (v,) in versions] == list(head_revisions())
    finally:
        await run_command(db.engine, "downgrade", "base")
        for d in [db, *others]:
            await d.close()


async def test_conversation_round_trip(pg: Database, settings):
    engine = FakeEngine()
    service = ChatService(pg, engine, settings)
    alice, bob = Speaker(BIG + 1, "alice"), Speaker(BIG + 2, "bob")
    messages = [IncomingMessage(BIG, BIG - 1, who, f"hi from {who.name}") for who in (alice, bob)]
    for msg in messages:
        async with service.reply(msg, bot=BOT) as reply:
            assert "".join([p async for p in reply]) == engine.reply_text
            reply.message_ids.append(BIG + 10)
    rows = await service.recent_messages(BIG, 10)
    assert [(r.role, r.status) for r in rows] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ] * 2
    assert rows[1].discord_message_ids == [BIG + 10] and rows[0].author_id == BIG + 1
    assert "bob: hi from bob" in engine.prompt_text(1)
    await service.update_settings(BIG, 1, temperature=0.5)
    with pytest.raises(SettingsError):
        await service.update_settings(BIG, 1, top_p=3)
    assert (await service.get_settings(BIG)).temperature == 0.5
    await service.set_persona(BIG, "terse", 1)
    await service.set_autoreply(BIG, True, 1)
    assert await service.is_autoreply(BIG) and await service.get_persona(BIG) == "terse"
    assert await service.forget(BIG, 1) == 4


async def test_interrupted_marking_and_concurrent_channel_creation(pg: Database):
    async def create() -> None:
        async with pg.session() as s, s.begin():
            await repo.ensure_channel(s, 5, guild_id=6)

    await asyncio.gather(*(create() for _ in range(5)))
    async with pg.session() as s, s.begin():
        await repo.add_message(s, channel_id=5, role="assistant", status=Status.IN_PROGRESS)
    assert await pg.mark_interrupted() == 1
    async with pg.session() as s:
        assert (await s.scalars(select(Message.status))).all() == ["interrupted"]
