"""Alembic environment: async-aware; the URL comes from the bot's BotConfig unless one is given."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from bot.storage.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """Explicit URL (bot.storage.migrate passes the Database's), else BotConfig.database_url."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from bot.config import get_settings

    return get_settings().database_url


def configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url.split(":")[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),  # ALTER on SQLite goes through table copies
        compare_type=True,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else {},
    )


def run_on(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async() -> None:
    """Standalone `alembic` CLI: our own async engine for the length of the command."""
    from bot.storage.db import Database

    db = Database(database_url())
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await db.close()


def main() -> None:
    if context.is_offline_mode():  # `alembic upgrade --sql`: print the DDL
        configure(url=database_url())
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:  # from bot.storage.migrate: the caller's connection and loop
        run_on(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(run_async())


main()
