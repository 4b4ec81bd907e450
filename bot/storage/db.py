"""The async database: engine, session factory, SQLite pragmas, start-up migration and recovery."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import event, literal_column, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.storage.migrate import run_command
from bot.storage.models import Channel, Message, Status

log = logging.getLogger(__name__)


class DatabaseError(Exception):
    """A database URL or file that cannot be used; one line for the user."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Each new SQLite connection: WAL journal, foreign keys, waiting instead of 'locked'."""
    dbapi_connection.isolation_level = None  # BEGIN is ours (_sqlite_begin_immediate)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    """Every SQLite transaction takes the write lock at BEGIN (one writer at a time, the others
    wait busy_timeout). A deferred one that reads first cannot upgrade its snapshot once another
    connection has committed: SQLite then says "database is locked" at once, without waiting, and
    concurrent mentions lost their messages so. (The driver's own BEGIN is off: see pragmas.)"""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _check_writable(path: Path) -> None:
    """Open the SQLite file and take a write lock, synchronously: a read-only disk or an
    unreadable file is reported here, before the async driver's thread would fail noisily."""
    try:
        connection = sqlite3.connect(path, timeout=10)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise OSError(f"{exc} ({path})") from exc


def _reason(exc: BaseException) -> str:
    """The driver's own words, one line (SQLAlchemy wraps them with SQL and a link)."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


Shards = tuple[Sequence[int], int]  # (the shard ids a bot process serves, the shard count)


class Database:
    """One async engine and its session factory. Use one unit of work per event:

    async with db.session() as s, s.begin():
        ...
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise DatabaseError(f"invalid database URL {url!r}") from None
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite" and parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"cannot create {folder} for the database: {exc}") from None
        try:
            # a server can drop idle connections (ping before use); a SQLite file cannot
            ping = self.dialect != "sqlite"
            self.engine: AsyncEngine = create_async_engine(url, echo=echo, pool_pre_ping=ping)
        except Exception as exc:  # missing driver, async-incapable driver, ...
            raise DatabaseError(f"cannot use database {parsed!r}: {exc}") from None
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin_immediate)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # replies an earlier run left in progress: (channel id, Discord message ids, row id)
        self.interrupted: list[tuple[int, list[int], int]] = []

    def __repr__(self) -> str:
        return f"Database({make_url(self.url)!r})"  # URL repr hides the password

    @classmethod
    async def open(
        cls, url: str, *, upgrade: bool = True, shards: Shards | None = None
    ) -> Database:
        """Start-up: connect, migrate to head, mark replies left in progress as interrupted
        (only in the channels of `shards` when given: other bot processes own the rest)."""
        db = cls(url)
        try:
            if db.sqlite_file is not None:
                await asyncio.to_thread(_check_writable, db.sqlite_file)
            if upgrade:
                await db.upgrade()
            await db.mark_interrupted(shards)
        except (DBAPIError, OSError) as exc:  # unreachable server, read-only or full disk, ...
            await db.close()
            raise DatabaseError(f"cannot use the database {db.safe_url}: {_reason(exc)}") from exc
        except BaseException:
            await db.close()
            raise
        return db

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, if this is one (not in memory)."""
        parsed = make_url(self.url)
        if self.dialect != "sqlite" or not parsed.database or parsed.database == ":memory:":
            return None
        return Path(parsed.database).expanduser()

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden, for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def session(self) -> AsyncSession:
        return self._sessions()

    async def upgrade(self, revision: str = "head") -> None:
        """Alembic upgrade on this engine (the same code as `python -m bot db upgrade`)."""
        await run_command(self.engine, "upgrade", revision)

    async def mark_interrupted(self, shards: Shards | None = None) -> int:
        """Replies still in progress from an earlier run become `interrupted` (finish reason
        "restart"); returns how many. `self.interrupted` keeps (channel id, Discord message
        ids, row id) of each, so the bot can tell the channel the reply was cut (and set its
        buttons). With `shards`, only those in channels of guilds these shards serve (DMs:
        shard 0): other processes own the rest."""
        query = select(Message.id, Message.channel_id, Message.discord_message_ids).where(
            Message.status == Status.IN_PROGRESS
        )
        if shards is not None:
            ids, count = shards  # Discord routes a guild to shard (id >> 22) % count
            shard = Channel.guild_id.op(">>")(literal_column("22")) % count
            mine = shard.in_(list(ids))
            if 0 in ids:
                mine = or_(mine, Channel.guild_id.is_(None))
            query = query.where(Message.channel_id.in_(select(Channel.id).where(mine)))
        async with self.session() as s, s.begin():
            rows = (await s.execute(query.order_by(Message.id))).all()
            await s.execute(
                update(Message)
                .where(Message.id.in_([row.id for row in rows]))
                .values(status=Status.INTERRUPTED, finish_reason="restart")
            )
        self.interrupted = [
            (row.channel_id, list(row.discord_message_ids or []), row.id) for row in rows
        ]
        count = len(rows)
        if count:
            log.warning(
                "marked %d reply(ies) left in progress by an earlier run as interrupted", count
            )
        return count

    async def close(self) -> None:
        await self.engine.dispose()
