"""`python -m bot db copy`: a SQLite history moved into PostgreSQL (BOT_TEST_POSTGRES_URL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.config import BotConfig
from bot.service import ChatService
from bot.storage.copy import copy_database
from bot.storage.db import Database, DatabaseError
from bot.storage.migrate import run_command
from bot.storage.models import AuditEntry, Message
from bot.turns import IncomingMessage, Speaker
from tests.bot_core.fakes import FakeEngine

URL = os.environ.get("BOT_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(
    not URL,
    reason="BOT_TEST_POSTGRES_URL not set (`make test` or scripts/test_services.sh starts one)",
)
ROOT = Path(__file__).resolve().parents[2]
BOT = Speaker(900, "Bot", is_bot=True)
BIG = 1_234_567_890_123_456_789


async def _empty_pg() -> None:
    db = Database(URL)
    await run_command(db.engine, "downgrade", "base")
    await db.close()


@pytest.fixture
async def pg():
    await _empty_pg()
    db = Database(URL)
    yield db
    await db.close()
    await _empty_pg()


async def _history(db: Database) -> list[tuple]:
    async with db.session() as s:
        rows = (await s.scalars(select(Message).order_by(Message.id))).all()
        audit = (await s.scalars(select(AuditEntry).order_by(AuditEntry.id))).all()
    return [
        (m.id, m.channel_id, m.role, m.content, m.status, m.created_at, m.discord_message_ids)
        for m in rows
    ] + [(a.id, a.actor_id, a.action, a.detail) for a in audit]


async def test_a_sqlite_history_moves_to_postgresql_whole(pg: Database, tmp_path: Path):
    sqlite = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    settings = BotConfig(_env_file=None, data_dir=tmp_path)
    service = ChatService(sqlite, FakeEngine(), settings)
    for i, who in enumerate([Speaker(BIG + 1, "alice"), Speaker(BIG + 2, "bob")]):
        msg = IncomingMessage(BIG + i, BIG - 1, who, f"hi from {who.name}", message_id=BIG + 5)
        async with service.reply(msg, bot=BOT) as reply:
            [_ async for _ in reply]
            reply.message_ids.append(BIG + 10 + i)
    await service.set_persona(BIG, "terse", BIG + 1)
    await service.update_settings(BIG, BIG + 1, temperature=0.5)
    try:
        copied = await copy_database(sqlite, pg)
        assert copied["messages"] == 4 and copied["channels"] == 2
        assert copied["channel_settings"] == 1 and copied["audit_log"] == 2
        assert await _history(pg) == await _history(sqlite)
        moved = ChatService(pg, FakeEngine(), settings)
        assert await moved.get_persona(BIG) == "terse"
        assert (await moved.get_settings(BIG)).temperature == 0.5
        msg = IncomingMessage(BIG, BIG - 1, Speaker(BIG + 1, "alice"), "still there?")
        async with moved.reply(msg, bot=BOT) as reply:  # new ids follow the copied ones
            [_ async for _ in reply]
        rows = await moved.recent_messages(BIG, 10)
        assert [r.content for r in rows][-2:] == ["still there?", FakeEngine().reply_text]
        assert rows[-1].id == 6
        with pytest.raises(DatabaseError, match="not empty"):
            await copy_database(sqlite, pg)
    finally:
        await sqlite.close()


def test_the_command_line_copies_and_refuses_a_bad_target(pg: Database, tmp_path: Path):
    source = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    command = [sys.executable, "-m", "bot", "db", "--database-url", source, "copy"]
    done = subprocess.run([*command, URL], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "messages: 0 rows" in done.stdout
    bad = subprocess.run([*command, "nonsense://"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
