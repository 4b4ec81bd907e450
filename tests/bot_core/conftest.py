"""Fixtures of the bot-core tests: a migrated SQLite database, a fake engine, a ChatService."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import BotConfig
from bot.service import ChatService
from bot.storage.db import Database
from tests.bot_core.fakes import FakeEngine


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "bot.db")


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> BotConfig:
    return BotConfig(_env_file=None, data_dir=tmp_path, database_url=db_url)


@pytest.fixture
async def db(db_url: str):
    database = await Database.open(db_url)
    yield database
    await database.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def service(db: Database, engine: FakeEngine, settings: BotConfig) -> ChatService:
    return ChatService(db, engine, settings)
