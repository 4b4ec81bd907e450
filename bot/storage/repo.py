"""Queries used by the conversation logic; each takes the session of the caller's unit of work."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from bot.generation import SETTINGS
from bot.storage.models import (
    AuditEntry,
    Channel,
    ChannelSettingsRow,
    Message,
    PendingMessage,
    Role,
    Status,
)


async def ensure_channel(s: AsyncSession, channel_id: int, guild_id: int | None = None) -> None:
    """Insert the channel if it is new (safe when two units of work race to create it)."""
    dialect = s.bind.dialect.name
    values = {"id": channel_id, "guild_id": guild_id, "autoreply": False}
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        stmt = insert(Channel).values(**values).on_conflict_do_nothing(index_elements=["id"])
        await s.execute(stmt)
    elif await s.get(Channel, channel_id) is None:  # other databases: check, then insert
        s.add(Channel(**values))
        await s.flush()
    if guild_id is not None:
        await s.execute(
            update(Channel)
            .where(Channel.id == channel_id, Channel.guild_id.is_(None))
            .values(guild_id=guild_id)
        )


async def get_channel(s: AsyncSession, channel_id: int) -> Channel | None:
    return await s.get(Channel, channel_id)


async def autoreply_channels(s: AsyncSession) -> set[int]:
    """Ids of the channels where the bot answers every message."""
    return set(await s.scalars(select(Channel.id).where(Channel.autoreply.is_(True))))


async def thread_reply_channels(s: AsyncSession) -> set[int]:
    """Ids of the channels whose answers go into a new thread each."""
    return set(await s.scalars(select(Channel.id).where(Channel.thread_replies.is_(True))))


async def get_message(s: AsyncSession, message_id: int) -> Message | None:
    return await s.get(Message, message_id)


async def asker_of(s: AsyncSession, reply: Message) -> int | None:
    """Who asked for a reply: the author of the newest user turn before it in its channel."""
    query = (
        select(Message.author_id)
        .where(
            Message.channel_id == reply.channel_id,
            Message.id < reply.id,
            Message.role == Role.USER,
        )
        .order_by(Message.id.desc())
        .limit(1)
    )
    return await s.scalar(query)


async def previous_reply(s: AsyncSession, reply: Message) -> Message | None:
    """The channel's assistant turn before `reply` (the one whose buttons it takes over)."""
    query = (
        select(Message)
        .where(
            Message.channel_id == reply.channel_id,
            Message.id < reply.id,
            Message.role == Role.ASSISTANT,
        )
        .order_by(Message.id.desc())
        .limit(1)
    )
    return (await s.scalars(query)).first()


async def add_message(s: AsyncSession, **fields: Any) -> Message:
    """A new turn; flushed so that its id is known."""
    ids = fields.pop("discord_message_ids", None) or []
    first = fields.pop("discord_message_id", None)
    if first is not None and first not in ids:
        ids = [first, *ids]
    message = Message(discord_message_id=ids[0] if ids else None, discord_message_ids=ids, **fields)
    s.add(message)
    await s.flush()
    return message


async def add_pending(
    s: AsyncSession,
    *,
    channel_id: int,
    author_id: int,
    author_name: str,
    content: str,
    discord_message_id: int | None,
) -> PendingMessage:
    """An accepted message into the inbox; flushed so that its id is known."""
    pending = PendingMessage(
        channel_id=channel_id,
        author_id=author_id,
        author_name=author_name,
        content=content,
        discord_message_id=discord_message_id,
    )
    s.add(pending)
    await s.flush()
    return pending


async def take_pending(s: AsyncSession, pending_id: int) -> bool:
    """Remove a message from the inbox; False if it was no longer there."""
    result = await s.execute(delete(PendingMessage).where(PendingMessage.id == pending_id))
    return bool(result.rowcount)


async def pending_messages(s: AsyncSession) -> list[PendingMessage]:
    """Everything in the inbox, in the order it was accepted."""
    return list((await s.scalars(select(PendingMessage).order_by(PendingMessage.id))).all())


async def in_progress_replies(s: AsyncSession) -> list[Message]:
    """Replies an earlier run left in progress (it ended before they did), oldest first."""
    query = select(Message).where(Message.status == Status.IN_PROGRESS).order_by(Message.id)
    return list((await s.scalars(query)).all())


async def update_message(s: AsyncSession, message_id: int, **fields: Any) -> None:
    if "discord_message_ids" in fields:
        ids = list(fields["discord_message_ids"])
        fields["discord_message_ids"] = ids
        fields["discord_message_id"] = ids[0] if ids else None
    await s.execute(update(Message).where(Message.id == message_id).values(**fields))


async def history(
    s: AsyncSession, channel_id: int, limit: int, *, include_forgotten: bool = False
) -> list[Message]:
    """The newest `limit` finished turns of a channel, oldest first (in-progress ones left out)."""
    query = select(Message).where(
        Message.channel_id == channel_id, Message.status != Status.IN_PROGRESS
    )
    if not include_forgotten:
        query = query.where(Message.forgotten.is_(False))
    rows = (await s.scalars(query.order_by(Message.id.desc()).limit(limit))).all()
    return list(reversed(rows))


async def forget(s: AsyncSession, channel_id: int) -> int:
    """Take every turn of the channel out of the conversation memory (the rows stay)."""
    result = await s.execute(
        update(Message)
        .where(
            Message.channel_id == channel_id,
            Message.forgotten.is_(False),
            Message.role != Role.SYSTEM,
        )
        .values(forgotten=True)
    )
    return result.rowcount or 0


async def count_messages(s: AsyncSession, channel_id: int) -> int:
    query = select(func.count()).select_from(Message).where(Message.channel_id == channel_id)
    return int(await s.scalar(query) or 0)


async def settings_overrides(s: AsyncSession, channel_id: int) -> dict[str, Any]:
    """The channel's own values (None where it uses the model's default)."""
    row = await s.get(ChannelSettingsRow, channel_id)
    return {key: getattr(row, key) if row else None for key in SETTINGS}


async def set_overrides(
    s: AsyncSession, channel_id: int, actor_id: int | None, values: dict[str, Any]
) -> None:
    """Write some overrides (None clears one); creates the settings row on first use."""
    row = await s.get(ChannelSettingsRow, channel_id)
    if row is None:
        row = ChannelSettingsRow(channel_id=channel_id)
        s.add(row)
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_by = actor_id
    await s.flush()


async def clear_overrides(s: AsyncSession, channel_id: int, actor_id: int | None) -> None:
    await set_overrides(s, channel_id, actor_id, dict.fromkeys(SETTINGS))


async def set_channel_fields(s: AsyncSession, channel_id: int, **fields: Any) -> None:
    await s.execute(update(Channel).where(Channel.id == channel_id).values(**fields))


async def add_audit(s: AsyncSession, actor_id: int, action: str, detail: str = "") -> None:
    s.add(AuditEntry(actor_id=actor_id, action=action, detail=detail))
    await s.flush()


async def audit_entries(s: AsyncSession, limit: int = 50) -> list[AuditEntry]:
    """The newest audit entries, newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    return list((await s.scalars(query)).all())
