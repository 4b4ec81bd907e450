"""Copy every row of one database into another (SQLite -> PostgreSQL), both migrated to head."""

from __future__ import annotations

from sqlalchemy import func, select, text

from bot.storage.db import Database, DatabaseError
from bot.storage.models import Base

BATCH = 1000


async def copy_database(source: Database, target: Database) -> dict[str, int]:
    """Rows copied per table. Both databases are upgraded to head first; the target must be
    empty (DatabaseError otherwise, nothing written). On PostgreSQL the id sequences are moved
    past the copied ids, so new rows get fresh ones."""
    await source.upgrade()
    await target.upgrade()
    tables = Base.metadata.sorted_tables  # parents before children
    async with target.engine.connect() as conn:
        for table in tables:
            count = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            if count:
                raise DatabaseError(
                    f"the target database is not empty ({table.name} has {count} rows); "
                    "copy into a freshly created database"
                )
    copied: dict[str, int] = {}
    async with source.engine.connect() as src, target.engine.begin() as dst:
        for table in tables:
            copied[table.name] = 0
            result = await src.stream(select(table).order_by(*table.primary_key.columns))
            async for rows in result.mappings().partitions(BATCH):
                await dst.execute(table.insert(), [dict(row) for row in rows])
                copied[table.name] += len(rows)
        if target.dialect == "postgresql":
            for table in tables:
                for column in table.primary_key.columns:
                    if column.autoincrement is True:
                        await dst.execute(
                            text(
                                f"SELECT setval(pg_get_serial_sequence('{table.name}', "
                                f"'{column.name}'), COALESCE(MAX({column.name}), 1), "
                                f"MAX({column.name}) IS NOT NULL) FROM {table.name}"
                            )
                        )
    return copied
