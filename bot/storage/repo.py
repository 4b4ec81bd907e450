"""Queries used by the conversation logic; each takes the session of the caller's unit of work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

from sqlalchemy import delete, select, update
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


async def add_message(
    s: AsyncSession,
    *,
    channel_id: int,
    role: Role,
    content: str = "",
    author_id: int | None = None,
    author_name: str = "",
    discord_message_id: int | None = None,
    token_count: int | None = None,
    prompt_tokens: int | None = None,
    model_version: str | None = None,
    status: Status = Status.COMPLETE,
) -> Message:
    """A new turn; flushed so that its id is known."""
    ids = [] if discord_message_id is None else [discord_message_id]
    message = Message(
        channel_id=channel_id,
        role=role,
        content=content,
        author_id=author_id,
        author_name=author_name,
        discord_message_id=discord_message_id,
        discord_message_ids=ids,
        token_count=token_count,
        prompt_tokens=prompt_tokens,
        model_version=model_version,
        status=status,
    )
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


class MessageUpdate(TypedDict, total=False):
    """What a reply's row learns while it streams and when it ends."""

    content: str
    discord_message_ids: Sequence[int]  # all of the reply's Discord messages, in order
    status: Status
    finish_reason: str
    model_version: str
    token_count: int
    queue_ms: float
    ttft_ms: float
    tokens_per_s: float
    duration_ms: float


async def update_message(s: AsyncSession, message_id: int, **fields: Unpack[MessageUpdate]) -> None:
    values: dict[str, Any] = dict(fields)
    if "discord_message_ids" in fields:
        ids = list(fields["discord_message_ids"])
        values.update(discord_message_ids=ids, discord_message_id=ids[0] if ids else None)
    await s.execute(update(Message).where(Message.id == message_id).values(**values))


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


async def set_persona(s: AsyncSession, channel_id: int, persona: str | None) -> None:
    await s.execute(update(Channel).where(Channel.id == channel_id).values(persona=persona))


async def set_autoreply(s: AsyncSession, channel_id: int, enabled: bool) -> None:
    await s.execute(update(Channel).where(Channel.id == channel_id).values(autoreply=enabled))


async def add_audit(s: AsyncSession, actor_id: int, action: str, detail: str = "") -> None:
    s.add(AuditEntry(actor_id=actor_id, action=action, detail=detail))
    await s.flush()
