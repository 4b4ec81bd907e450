"""`python -m bot db upgrade [REV] | current | downgrade [REV] | history`: Alembic migrations;
`python -m bot db export-dialogues --guild ID --out FILE.jsonl`: a server's training data;
`python -m bot db copy URL`: every row into another, empty database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from alembic.util import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from bot.config import ConfigError, load_settings
from bot.storage.db import Database, DatabaseError
from bot.storage.migrate import current_revisions, head_revisions, run_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--database-url is taken before the action or after it (`db copy URL --database-url X`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(  # SUPPRESS: given after the action only, it never resets one before
        "--database-url", default=argparse.SUPPRESS, help="database URL (default: DATABASE_URL)"
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser("upgrade", parents=[common], help="migrate to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    sub.add_parser("current", parents=[common], help="show the database's revision")
    down = sub.add_parser(
        "downgrade", parents=[common], help="migrate back (default: one revision, -1)"
    )
    down.add_argument("revision", nargs="?", default="-1", help="-1, a revision id, or base")
    sub.add_parser("history", parents=[common], help="list the revisions")
    export = sub.add_parser(
        "export-dialogues",
        parents=[common],
        help="a server's stored conversations as .jsonl for `python -m models finetune`",
    )
    export.add_argument("--guild", type=int, required=True, help="the server (guild) id")
    export.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    export.add_argument(
        "--max-exchanges",
        type=int,
        default=None,
        help="user/bot exchanges per conversation at most (default: 8)",
    )
    copy = sub.add_parser(
        "copy", parents=[common], help="copy every row into another, empty database"
    )
    copy.add_argument("target", help="the target's URL, e.g. postgresql+asyncpg://...")
    parser.add_argument(
        "--database-url", default=None, help="database URL (default: DATABASE_URL / settings)"
    )


def _revisions(revisions: tuple[str, ...], heads: tuple[str, ...]) -> str:
    if not revisions:
        return "an empty schema (no revision)"
    text = ", ".join(revisions)
    return text + (" (head)" if set(revisions) == set(heads) else "")


async def _export(url: str, guild_id: int, out: Path, max_exchanges: int | None) -> None:
    from bot.dialogues import MAX_EXCHANGES, guild_dialogues, write_jsonl
    from bot.privacy import PrivacyService

    if max_exchanges is not None and max_exchanges < 1:
        raise DatabaseError("--max-exchanges must be at least 1")
    db = await Database.open(url)
    try:
        excluded = await PrivacyService(db).opted_out_users()
        records = await guild_dialogues(db, guild_id, excluded, max_exchanges or MAX_EXCHANGES)
    finally:
        await db.close()
    if not records:
        raise DatabaseError(f"guild {guild_id}: no stored conversations to export")
    try:
        write_jsonl(out, records)
    except OSError as exc:
        raise DatabaseError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {len(records)} conversation(s) of guild {guild_id} to {out}")


async def _copy(url: str, target_url: str) -> None:
    from bot.storage.copy import copy_database

    source, target = Database(url), Database(target_url)
    try:
        copied = await copy_database(source, target)
    finally:
        await source.close()
        await target.close()
    for table, count in copied.items():
        print(f"{table}: {count} rows")


async def _run(url: str, action: str, revision: str | None) -> None:
    db = Database(url)
    try:
        if action in ("upgrade", "downgrade"):
            before = await current_revisions(db.engine)
            await run_command(db.engine, action, revision)
            after = await current_revisions(db.engine)
            heads = head_revisions()
            where = make_url(url).render_as_string(hide_password=True)
            if before == after:
                print(f"{where}: already at {_revisions(after, heads)}; nothing to do")
            else:
                done = "upgraded" if action == "upgrade" else "downgraded"
                print(
                    f"{where}: {done} from {_revisions(before, heads)} "
                    f"to {_revisions(after, heads)}"
                )
        elif action == "current":
            await run_command(db.engine, "current", verbose=False)
        else:
            await run_command(db.engine, "history")
    finally:
        await db.close()


class _StepsOnly(logging.Filter):
    """Alembic's 'Running upgrade A -> B' lines, without its chatter about the dialect."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage().startswith("Running ")


def main(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.addFilter(_StepsOnly())
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    try:
        url = args.database_url or load_settings().database_url
        if args.action == "export-dialogues":
            asyncio.run(_export(url, args.guild, args.out, args.max_exchanges))
        elif args.action == "copy":
            asyncio.run(_copy(url, args.target))
        else:
            asyncio.run(_run(url, args.action, getattr(args, "revision", None)))
    except (ConfigError, DatabaseError, CommandError) as exc:  # e.g. an unknown revision
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, SQLAlchemyError) as exc:  # a server that cannot be reached
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0
