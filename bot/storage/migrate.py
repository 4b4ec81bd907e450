"""Alembic through its command API, on the bot's own async engine (CLI and start-up share this)."""

from __future__ import annotations

from importlib.resources import as_file, files
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import text

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncEngine

# PostgreSQL advisory lock key of migrations ("dllm" in ASCII): processes that start together
# (shards, workers) migrate one after the other; the later ones then find nothing to do
MIGRATION_LOCK = 0x646C6C6D

COMMANDS = {
    "upgrade": command.upgrade,
    "downgrade": command.downgrade,
    "current": command.current,
    "history": command.history,
}


def migrations_dir() -> str:
    """The folder of the `migrations` package (env.py, versions/), installed or in a checkout."""
    # a package installed from a wheel or a checkout is a plain folder, never a zip: as_file
    # gives its own path
    with as_file(files("migrations")) as folder:
        return str(folder)


def alembic_config(url: str | None = None) -> Config:
    """The Alembic config of the migrations package; `url` wins over BotConfig.database_url in
    env.py."""
    folder = migrations_dir()
    cfg = Config(f"{folder}/alembic.ini")
    cfg.set_main_option("script_location", folder)
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


async def run_command(engine: AsyncEngine, name: str, *args: Any, **kwargs: Any) -> None:
    """Run an Alembic command (upgrade, downgrade, current, history) on one connection of
    `engine`.

    env.py sees the connection in `config.attributes` and runs the migrations on it, so an
    already running event loop is fine and the engine's connect hooks (SQLite pragmas) apply.
    On PostgreSQL the transaction first takes an advisory lock, so that processes starting at
    once on a new schema do not run the same migration side by side (Alembic takes no lock);
    SQLite's own write lock serialises them there.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    fn = COMMANDS[name]

    def run(connection: Connection) -> None:
        cfg.attributes["connection"] = connection
        fn(cfg, *args, **kwargs)

    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # released when the transaction ends
            await connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        await connection.run_sync(run)


async def current_revisions(engine: AsyncEngine) -> tuple[str, ...]:
    """The revision(s) the database is at; () for a database never migrated."""
    from alembic.migration import MigrationContext

    def read(connection: Connection) -> tuple[str, ...]:
        return tuple(MigrationContext.configure(connection).get_current_heads())

    async with engine.connect() as connection:
        return await connection.run_sync(read)


def head_revisions() -> tuple[str, ...]:
    """The newest revision(s) of migrations/."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())
