"""Users' privacy: opting out of storage, forgetting a user, exporting a user's data, retention.

- Opted out (`/privacy opt-out`, for every server and DM): the user's messages are never
  written, not even to the inbox; the bot answers each from the live message alone (the
  channel's persona and settings, no history) and stores nothing of the exchange. Such a
  message is lost if the bot crashes before answering (the user asks again); everyone else's
  messages are stored at once, as before. Their rows stored before opting out stay until
  `/privacy forget-me`, but no training export contains them. A message accepted before its
  author opted out (waiting for its turn, or in the inbox across a restart) leaves the inbox
  and is answered the same way.
- Forget me (`/privacy forget-me`): deletes the user's turns in every channel of the server and
  in their DMs with the bot, the inbox rows waiting for an answer, and the bot's replies to
  them (a reply often repeats what it answers, and an answer without its question does not keep
  a conversation coherent anyway); in a DM the whole conversation is theirs and goes entirely.
  Other members' turns and the bot's replies to them stay. The audit log of moderation actions
  keeps its entries (ids only) and records the deletion without content.
- Retention (`HISTORY_RETENTION_DAYS`, 0: keep): stored turns and inbox rows older than that are
  deleted, in batches, by a periodic task of the bot.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from bot.storage import repo
from bot.storage.models import Role

if TYPE_CHECKING:
    from bot.storage.db import Database

log = logging.getLogger(__name__)

PURGE_BATCH = 1000  # rows deleted per transaction by the retention task
RETENTION_EVERY_S = 3600.0  # how often the retention task deletes expired turns


@dataclass(frozen=True)
class Forgotten:
    """What /privacy forget-me deleted."""

    turns: int  # the user's own turns
    replies: int  # the bot's replies to them (and the rest of their DM conversations)
    pending: int  # inbox rows not yet answered
    # (channel id, message id) of the "in line" placeholders shown for those rows: deleted from
    # Discord at once, since no later answer (nor a restart, which reads the inbox) replaces them
    placeholders: tuple[tuple[int, int], ...] = ()


def replies_to(outline: list[tuple[int, int, str, int | None]], user_id: int) -> set[int]:
    """Ids of the bot's replies to `user_id`'s turns: in a channel's id order, the assistant rows
    after one of their user turns, up to the next user turn (turns in a channel are answered one
    at a time, so a reply follows the turn it answers)."""
    found: set[int] = set()
    channel, theirs = None, False
    for row_id, channel_id, role, author_id in outline:
        if channel_id != channel:
            channel, theirs = channel_id, False
        if role == Role.USER:
            theirs = author_id == user_id
        elif role == Role.ASSISTANT and theirs:
            found.add(row_id)
    return found


class PrivacyService:
    """Opt-outs, forget-me, export, retention. Nothing is cached: an opt-out made through any
    process (another shard) applies to the next message everywhere."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.purged = 0  # turns the retention task deleted since the start

    async def opted_out(self, user_id: int) -> bool:
        async with self.db.session() as s:
            return await repo.is_opted_out(s, user_id)

    async def opted_out_users(self) -> set[int]:
        async with self.db.session() as s:
            return await repo.opted_out_users(s)

    async def set_opted_out(self, user_id: int, opted_out: bool) -> None:
        async with self.db.session() as s, s.begin():
            await repo.set_opted_out(s, user_id, opted_out)
            action = "privacy.opt-out" if opted_out else "privacy.opt-in"
            await repo.add_audit(s, user_id, action, f"user {user_id}")

    async def forget_me(self, user_id: int, guild_id: int | None) -> Forgotten:
        """Delete the user's stored data in a server's channels and in their DMs (see the
        module docstring); one transaction."""
        async with self.db.session() as s, s.begin():
            own = await repo.user_messages(s, user_id, guild_id)
            turns = {row.id for row in own}
            channels = {row.channel_id for row in own}
            dm_channels = {
                row.channel_id
                for row in own
                if (channel := await repo.get_channel(s, row.channel_id)) is not None
                and channel.guild_id is None
            }
            outline = await repo.channel_outline(s, channels)
            replies = replies_to(outline, user_id)
            replies |= {row_id for row_id, channel_id, _, _ in outline if channel_id in dm_channels}
            replies -= turns
            await repo.delete_messages(s, sorted(turns | replies))
            pending = await repo.user_pending(s, user_id, guild_id)
            await repo.delete_pending(s, [p.id for p in pending])
            held = tuple(
                (p.channel_id, p.held_message_id) for p in pending if p.held_message_id is not None
            )
            result = Forgotten(len(turns), len(replies), len(pending), held)
            where = f"guild {guild_id}" if guild_id is not None else "DMs"
            await repo.add_audit(
                s,
                user_id,
                "privacy.forget-me",
                f"user {user_id} in {where} and DMs: {result.turns} turns, "
                f"{result.replies} replies, {result.pending} waiting",
            )
        return result

    async def export(self, user_id: int, guild_id: int | None) -> dict[str, Any]:
        """The user's stored data in a server's channels and their DMs, JSON-ready."""
        async with self.db.session() as s:
            own = await repo.user_messages(s, user_id, guild_id)
            pending = await repo.user_pending(s, user_id, guild_id)
            privacy = await repo.user_privacy(s, user_id)
        return {
            "user_id": str(user_id),
            "guild_id": str(guild_id) if guild_id is not None else None,
            "exported_at": datetime.now(UTC).isoformat(),
            "opted_out": bool(privacy and privacy.opted_out),
            "messages": [
                {
                    "channel_id": str(row.channel_id),
                    "discord_message_id": (
                        str(row.discord_message_id) if row.discord_message_id else None
                    ),
                    "author_name": row.author_name,
                    "content": row.content,
                    "created_at": row.created_at.isoformat(),
                    "forgotten": row.forgotten,
                }
                for row in own
            ],
            "waiting": [
                {
                    "channel_id": str(p.channel_id),
                    "content": p.content,
                    "received_at": p.received_at.isoformat(),
                }
                for p in pending
            ],
        }

    async def purge_expired(
        self, days: int, *, now: datetime | None = None, batch: int = PURGE_BATCH
    ) -> int:
        """Delete stored turns and inbox rows older than `days` days (0: keep everything), in
        transactions of at most `batch` rows; how many turns went."""
        if days <= 0:
            return 0
        cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
        total = 0
        while True:
            async with self.db.session() as s, s.begin():
                count = await repo.delete_older_than(s, cutoff, batch)
            total += count
            if count < batch:
                break
        async with self.db.session() as s, s.begin():
            await repo.delete_pending_older_than(s, cutoff)
        if total:
            log.info("retention: deleted %d turn(s) older than %d day(s)", total, days)
        return total

    async def retain(self, days: int) -> None:
        """The retention task: purge now, then every RETENTION_EVERY_S, until cancelled; a
        failure is logged and waits for the next round."""
        while True:
            try:
                self.purged += await self.purge_expired(days)
            except Exception:
                log.exception("retention: could not delete expired turns")
            await asyncio.sleep(RETENTION_EVERY_S)
