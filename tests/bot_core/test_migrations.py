"""Alembic: upgrade/downgrade on a fresh SQLite file, ORM = migrated schema, CLI, PostgreSQL SQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from bot.storage.db import Database
from bot.storage.migrate import alembic_config, head_revisions, run_command
from bot.storage.models import Base

ROOT = Path(__file__).resolve().parents[2]
HEAD = ", ".join(head_revisions())
TABLES = {"channels", "messages", "channel_settings", "audit_log"}


async def tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def test_upgrade_downgrade_upgrade_on_a_fresh_file(db_url: str):
    db = Database(db_url)
    try:
        assert await tables(db) == set()
        await db.upgrade()
        assert await tables(db) == TABLES | {"alembic_version"}
        assert await revision(db) == "0001"
        await run_command(db, "downgrade", "base")
        assert await tables(db) == {"alembic_version"}
        assert await revision(db) is None
        await db.upgrade()
        await db.upgrade()  # at head already: nothing to do
        assert await revision(db) == "0001"
    finally:
        await db.close()


async def test_upgrade_reports_the_revisions_and_hides_the_password(capsys, db_url: str):
    from bot.storage.cli import _run

    await _run(db_url, "upgrade", "head")
    await _run(db_url, "upgrade", "head")
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith(f"upgraded from an empty schema (no revision) to {HEAD} (head)")
    assert second.endswith(f"already at {HEAD} (head); nothing to do")


async def test_orm_metadata_matches_the_migrated_schema(db_url: str):
    db = Database(db_url)
    try:
        await db.upgrade()
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(
                        c, opts={"compare_type": True, "compare_server_default": True}
                    ),
                    Base.metadata,
                )
            )
    finally:
        await db.close()
    assert diff == []


def run_bot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m bot ...` from an empty folder (no .env of the checkout is read)."""
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=env["DATA_DIR"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_cli_upgrade_current_downgrade(tmp_path: Path):
    db_file = tmp_path / "sub" / "cli.db"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{db_file}",
        "DATA_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    up = run_bot("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    assert db_file.is_file()
    assert up.stdout == (
        f"sqlite+aiosqlite:///{db_file}: upgraded from an empty schema (no revision) "
        f"to {HEAD} (head)\n"
    )
    again = run_bot("db", "upgrade", env=env)
    assert again.returncode == 0 and again.stdout.endswith(
        f": already at {HEAD} (head); nothing to do\n"
    )
    current = run_bot("db", "current", env=env)
    assert current.returncode == 0 and "0001 (head)" in current.stdout
    down = run_bot("db", "downgrade", env=env)
    assert down.returncode == 0, down.stderr
    assert f"downgraded from {HEAD} (head) to " in down.stdout
    assert "0001" not in run_bot("db", "current", env=env).stdout
    bad = run_bot("db", "downgrade", "nosuchrev", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nosuchrev" in bad.stderr


def test_offline_sql_for_postgresql(capsys):
    """`alembic upgrade --sql` renders the initial revision for PostgreSQL (no server needed)."""
    cfg = alembic_config("postgresql://user:pw@localhost/bot")
    command.upgrade(cfg, "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE messages" in sql and "id BIGSERIAL NOT NULL" in sql
    assert "CREATE INDEX ix_messages_channel_history ON messages (channel_id, forgotten, id)" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql
