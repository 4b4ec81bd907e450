"""Alembic: upgrade/downgrade on a fresh SQLite file, ORM = migrated schema, CLI, PostgreSQL SQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from bot.storage.db import Database
from bot.storage.migrate import alembic_config, head_revisions, run_command
from bot.storage.models import Base

ROOT = Path(__file__).resolve().parents[2]
HEAD = ", ".join(head_revisions())
TABLES = {
    "channels",
    "messages",
    "inbox",
    "channel_settings",
    "audit_log",
    "guild_settings",
    "access_rules",
    "user_privacy",
    "jobs",
}


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
        assert await revision(db) == HEAD
        await run_command(db.engine, "downgrade", "base")
        assert await tables(db) == {"alembic_version"}
        assert await revision(db) is None
        await db.upgrade()
        await db.upgrade()  # at head already: nothing to do
        assert await revision(db) == HEAD
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
    assert current.returncode == 0 and f"{HEAD} (head)" in current.stdout
    down = run_bot("db", "downgrade", env=env)
    assert down.returncode == 0, down.stderr
    assert f"downgraded from {HEAD} (head) to " in down.stdout
    assert f"{HEAD} (head)" not in run_bot("db", "current", env=env).stdout
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
    assert "CONSTRAINT uq_access_rules_guild_id_kind_target_id UNIQUE" in sql
    assert "CREATE INDEX ix_messages_created_at ON messages (created_at)" in sql
    assert "UPDATE alembic_version SET version_num='0003'" in sql


INSTALLED_CHECK = """
import asyncio, sys
from pathlib import Path
import bot, migrations
from bot.storage.db import Database
from bot.storage.migrate import migrations_dir

target = Path(sys.argv[1]).resolve()
for module in (bot, migrations):
    assert target in Path(module.__file__).resolve().parents, module.__file__
assert target in Path(migrations_dir()).resolve().parents, migrations_dir()

async def main():
    db = await Database.open(sys.argv[2])  # migrates to head
    try:
        async with db.engine.connect() as c:
            rows = await c.exec_driver_sql("SELECT version_num FROM alembic_version")
            print(rows.scalar_one())
    finally:
        await db.close()

asyncio.run(main())
"""


def test_an_installed_wheel_carries_and_finds_its_migrations(tmp_path: Path):
    """Built as a wheel and installed elsewhere, the bot migrates a database to head without the
    source checkout (cwd elsewhere, only the install on the path)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("bot", "export", "models", "migrations"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    quiet = {"capture_output": True, "text": True, "timeout": 120}
    wheel = subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        **quiet,
    )
    assert wheel.returncode == 0, wheel.stderr
    (built,) = (tmp_path / "dist").glob("*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(built)], **quiet
    )
    assert install.returncode == 0, install.stderr
    shutil.rmtree(src)  # nothing of the sources is left to fall back on

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BOT_CONFIG")}
    env["PYTHONPATH"] = str(target)
    url = f"sqlite+aiosqlite:///{tmp_path / 'installed.db'}"
    done = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK, str(target), url], cwd=elsewhere, env=env, **quiet
    )
    assert done.returncode == 0, done.stderr
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert done.stdout.split() == [head]
