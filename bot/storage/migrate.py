"""Alembic through its command API, on the bot's own async engine (CLI and start-up share this)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from bot.storage.db import Database

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
ALEMBIC_INI = MIGRATIONS_DIR / "alembic.ini"

COMMANDS = {
    "upgrade": command.upgrade,
    "downgrade": command.downgrade,
    "current": command.current,
    "history": command.history,
}


def alembic_config(url: str | None = None) -> Config:
    """The Alembic config of migrations/; `url` wins over Settings.database_url in env.py."""
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


async def run_command(db: Database, name: str, *args: Any, **kwargs: Any) -> None:
    """Run an Alembic command (upgrade, downgrade, current, history) on one connection of `db`.

    env.py sees the connection in `config.attributes` and runs the migrations on it, so an
    already running event loop is fine and the SQLite pragmas of the Database apply.
    """
    cfg = alembic_config(db.url)
    fn = COMMANDS[name]

    def run(connection: Connection) -> None:
        cfg.attributes["connection"] = connection
        fn(cfg, *args, **kwargs)

    async with db.engine.begin() as connection:
        await connection.run_sync(run)


async def current_revisions(db: Database) -> tuple[str, ...]:
    """The revision(s) the database is at; () for a database never migrated."""
    from alembic.migration import MigrationContext

    def read(connection: Connection) -> tuple[str, ...]:
        return tuple(MigrationContext.configure(connection).get_current_heads())

    async with db.engine.connect() as connection:
        return await connection.run_sync(read)


def head_revisions() -> tuple[str, ...]:
    """The newest revision(s) of migrations/."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())
