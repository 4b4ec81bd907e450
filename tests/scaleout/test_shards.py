"""A bot process that restarts marks only its own shards' replies interrupted, on SQLite and on
PostgreSQL (BOT_TEST_POSTGRES_URL): other shard processes may be answering in theirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.storage import repo
from bot.storage.db import Database
from bot.storage.migrate import run_command
from bot.storage.models import Message, Status

PG_URL = os.environ.get("BOT_TEST_POSTGRES_URL")


def guild_on_shard(shard: int, count: int, n: int = 1) -> int:
    """A guild id (snowflake) that Discord routes to `shard` of `count`."""
    return ((count * (1_000_000 + n) + shard) << 22) | 12345


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
        return
    if not PG_URL:
        pytest.skip("BOT_TEST_POSTGRES_URL not set (`make test` starts a PostgreSQL)")
    db = Database(PG_URL)
    await run_command(db.engine, "downgrade", "base")
    yield PG_URL
    await run_command(db.engine, "downgrade", "base")
    await db.close()


async def test_only_the_restarting_shards_replies_are_marked_interrupted(url: str):
    db = await Database.open(url)
    channels = {  # channel -> guild: shards 0, 1, 2 of 3, and a DM
        10: guild_on_shard(0, 3),
        11: guild_on_shard(1, 3),
        12: guild_on_shard(2, 3),
        13: None,
    }
    async with db.session() as s, s.begin():
        for channel, guild in channels.items():
            await repo.ensure_channel(s, channel, guild)
            await repo.add_message(s, channel_id=channel, role="assistant", status="in_progress")
    await db.close()
    db = await Database.open(url, shards=([1, 2], 3))  # shards 1 and 2 restart
    try:
        async with db.session() as s:
            rows = (await s.execute(select(Message.channel_id, Message.status))).all()
        assert dict(rows) == {
            10: Status.IN_PROGRESS,
            11: Status.INTERRUPTED,
            12: Status.INTERRUPTED,
            13: Status.IN_PROGRESS,
        }
        assert await db.mark_interrupted(([0], 3)) == 2  # shard 0 has the DM too
        assert await db.mark_interrupted() == 0
    finally:
        await db.close()


def test_shard_settings(monkeypatch):
    from bot.config import ConfigError, load_settings

    monkeypatch.setenv("SHARD_COUNT", "4")
    monkeypatch.setenv("SHARD_IDS", "2, 3")
    assert load_settings().shards() == ([2, 3], 4)
    monkeypatch.delenv("SHARD_IDS")
    assert load_settings().shards() == ([0, 1, 2, 3], 4)
    monkeypatch.delenv("SHARD_COUNT")
    assert load_settings().shards() is None
    for count, ids, message in [
        ("0", "1", "SHARD_IDS needs SHARD_COUNT"),
        ("2", "0,2", "distinct numbers from 0 to 1"),
        ("2", "1,1", "distinct numbers from 0 to 1"),
    ]:
        monkeypatch.setenv("SHARD_COUNT", count)
        monkeypatch.setenv("SHARD_IDS", ids)
        with pytest.raises(ConfigError, match=message):
            load_settings()


async def test_nul_characters_from_a_model_are_stored_on_postgresql_too(url: str):
    db = await Database.open(url)
    try:
        async with db.session() as s, s.begin():
            await repo.ensure_channel(s, 1, None)
            row = await repo.add_message(s, channel_id=1, role="assistant", content="a\x00b")
            await repo.update_message(s, row.id, content="c\x00d")
        kept = "c\x00d" if url.startswith("sqlite") else "c\ufffdd"
        async with db.session() as s:
            assert (await s.scalars(select(Message.content))).all() == [kept]
    finally:
        await db.close()
