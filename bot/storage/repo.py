"""Queries used by the conversation logic; each takes the session of the caller's unit of work."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypedDict, Unpack

from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from bot.generation import SETTINGS
from bot.storage.models import (
    AccessRule,
    AuditEntry,
    Channel,
    ChannelSettingsRow,
    Editors,
    GuildSettingsRow,
    Message,
    PendingMessage,
    Role,
    Status,
    UserPrivacy,
)

DELETE_CHUNK = 500  # ids per DELETE ... WHERE id IN (...): well under every backend's limit


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


async def get_message(s: AsyncSession, message_id: int) -> Message | None:
    return await s.get(Message, message_id)


async def _turn_before(s: AsyncSession, reply: Message, role: Role) -> Message | None:
    """The channel's newest turn of `role` before `reply`."""
    query = (
        select(Message)
        .where(Message.channel_id == reply.channel_id, Message.id < reply.id, Message.role == role)
        .order_by(Message.id.desc())
        .limit(1)
    )
    return (await s.scalars(query)).first()


async def asker_of(s: AsyncSession, reply: Message) -> int | None:
    """Who asked for a reply: the author of the newest user turn before it in its channel."""
    asked = await _turn_before(s, reply, Role.USER)
    return asked.author_id if asked is not None else None


async def previous_reply(s: AsyncSession, reply: Message) -> Message | None:
    """The channel's assistant turn before `reply` (the one whose buttons it takes over)."""
    return await _turn_before(s, reply, Role.ASSISTANT)


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
    held_message_id: int | None = None,
) -> PendingMessage:
    """An accepted message into the inbox (with the "in line" placeholder already shown for
    it, if any); flushed so that its id is known."""
    pending = PendingMessage(
        channel_id=channel_id,
        author_id=author_id,
        author_name=author_name,
        content=content,
        discord_message_id=discord_message_id,
        held_message_id=held_message_id,
    )
    s.add(pending)
    await s.flush()
    return pending


async def take_pending(s: AsyncSession, pending_id: int) -> bool:
    """Remove a message from the inbox; False if it was no longer there."""
    result = await s.execute(delete(PendingMessage).where(PendingMessage.id == pending_id))
    return bool(result.rowcount)


async def hold_pending(s: AsyncSession, pending_id: int, message_id: int) -> bool:
    """Remember the placeholder shown for a waiting message; False if it left the inbox."""
    result = await s.execute(
        update(PendingMessage)
        .where(PendingMessage.id == pending_id)
        .values(held_message_id=message_id)
    )
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


def _values(row: ChannelSettingsRow | GuildSettingsRow | None) -> dict[str, Any]:
    return {key: getattr(row, key) if row else None for key in SETTINGS}


async def settings_layers(
    s: AsyncSession, channel_id: int, guild_id: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the server's defaults, the channel's own values) of a channel; None where not set.
    The server is the one stored with the channel, else `guild_id`."""
    channel = await s.get(Channel, channel_id)
    if channel is not None and channel.guild_id is not None:
        guild_id = channel.guild_id
    server = await s.get(GuildSettingsRow, guild_id) if guild_id is not None else None
    return _values(server), _values(await s.get(ChannelSettingsRow, channel_id))


async def settings_overrides(s: AsyncSession, channel_id: int) -> dict[str, Any]:
    """What a channel overrides of the model's defaults: its own values over its server's
    defaults (None where neither sets one)."""
    server, own = await settings_layers(s, channel_id)
    return {key: own[key] if own[key] is not None else server[key] for key in SETTINGS}


async def guild_settings(s: AsyncSession, guild_id: int) -> GuildSettingsRow | None:
    return await s.get(GuildSettingsRow, guild_id)


async def _guild_row(s: AsyncSession, guild_id: int) -> GuildSettingsRow:
    row = await s.get(GuildSettingsRow, guild_id)
    if row is None:
        row = GuildSettingsRow(
            guild_id=guild_id, settings_editors=Editors.EVERYONE, persona_editors=Editors.MANAGERS
        )
        s.add(row)
    return row


async def set_guild_overrides(
    s: AsyncSession, guild_id: int, actor_id: int | None, values: dict[str, Any]
) -> None:
    """Write some server defaults (None clears one); creates the server's row on first use."""
    row = await _guild_row(s, guild_id)
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_by = actor_id
    await s.flush()


async def set_editors(
    s: AsyncSession,
    guild_id: int,
    actor_id: int | None,
    *,
    settings: Editors | None = None,
    persona: Editors | None = None,
) -> GuildSettingsRow:
    """Who may change settings and personas in a server (None: leave as it is)."""
    row = await _guild_row(s, guild_id)
    if settings is not None:
        row.settings_editors = settings
    if persona is not None:
        row.persona_editors = persona
    row.updated_by = actor_id
    await s.flush()
    return row


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


# ---- access lists -------------------------------------------------------------------------------
async def access_rules(s: AsyncSession, guild_id: int) -> list[AccessRule]:
    query = select(AccessRule).where(AccessRule.guild_id == guild_id).order_by(AccessRule.id)
    return list((await s.scalars(query)).all())


async def set_access_rule(
    s: AsyncSession, guild_id: int, kind: str, target_id: int, effect: str, actor_id: int | None
) -> None:
    """Allow or deny one channel, role or user (replacing its earlier entry, if any)."""
    await remove_access_rule(s, guild_id, kind, target_id)
    s.add(
        AccessRule(
            guild_id=guild_id, kind=kind, target_id=target_id, effect=effect, created_by=actor_id
        )
    )
    await s.flush()


async def remove_access_rule(s: AsyncSession, guild_id: int, kind: str, target_id: int) -> bool:
    """Take one channel, role or user off the server's lists; False if it was on none."""
    result = await s.execute(
        delete(AccessRule).where(
            AccessRule.guild_id == guild_id,
            AccessRule.kind == kind,
            AccessRule.target_id == target_id,
        )
    )
    return bool(result.rowcount)


async def clear_access_rules(s: AsyncSession, guild_id: int) -> int:
    result = await s.execute(delete(AccessRule).where(AccessRule.guild_id == guild_id))
    return result.rowcount or 0


# ---- privacy and retention ----------------------------------------------------------------------
async def opted_out_users(s: AsyncSession) -> set[int]:
    query = select(UserPrivacy.user_id).where(UserPrivacy.opted_out.is_(True))
    return set(await s.scalars(query))


async def is_opted_out(s: AsyncSession, user_id: int) -> bool:
    row = await s.get(UserPrivacy, user_id)
    return bool(row is not None and row.opted_out)


async def set_opted_out(s: AsyncSession, user_id: int, opted_out: bool) -> None:
    row = await s.get(UserPrivacy, user_id)
    if row is None:
        s.add(UserPrivacy(user_id=user_id, opted_out=opted_out))
    else:
        row.opted_out = opted_out
    await s.flush()


async def user_privacy(s: AsyncSession, user_id: int) -> UserPrivacy | None:
    return await s.get(UserPrivacy, user_id)


def _in_scope(guild_id: int | None) -> Any:
    """Channels of a server and every DM (channels without a server); DMs only for None."""
    if guild_id is None:
        return Channel.guild_id.is_(None)
    return or_(Channel.guild_id == guild_id, Channel.guild_id.is_(None))


async def user_messages(s: AsyncSession, user_id: int, guild_id: int | None) -> list[Message]:
    """A user's own stored turns in a server's channels and in DMs, oldest first."""
    scope = select(Channel.id).where(_in_scope(guild_id))
    query = (
        select(Message)
        .where(Message.author_id == user_id, Message.channel_id.in_(scope))
        .order_by(Message.id)
    )
    return list((await s.scalars(query)).all())


async def user_pending(s: AsyncSession, user_id: int, guild_id: int | None) -> list[PendingMessage]:
    scope = select(Channel.id).where(_in_scope(guild_id))
    query = (
        select(PendingMessage)
        .where(PendingMessage.author_id == user_id, PendingMessage.channel_id.in_(scope))
        .order_by(PendingMessage.id)
    )
    return list((await s.scalars(query)).all())


async def channel_outline(
    s: AsyncSession, channel_ids: Iterable[int]
) -> list[tuple[int, int, str, int | None]]:
    """(id, channel id, role, author id) of every stored turn of these channels, in order."""
    query = (
        select(Message.id, Message.channel_id, Message.role, Message.author_id)
        .where(Message.channel_id.in_(list(channel_ids)))
        .order_by(Message.channel_id, Message.id)
    )
    return [tuple(row) for row in (await s.execute(query)).all()]  # type: ignore[misc]


async def delete_messages(s: AsyncSession, ids: Sequence[int]) -> int:
    count = 0
    for start in range(0, len(ids), DELETE_CHUNK):
        chunk = list(ids[start : start + DELETE_CHUNK])
        result = await s.execute(delete(Message).where(Message.id.in_(chunk)))
        count += result.rowcount or 0
    return count


async def delete_pending(s: AsyncSession, ids: Sequence[int]) -> int:
    result = await s.execute(delete(PendingMessage).where(PendingMessage.id.in_(list(ids))))
    return result.rowcount or 0


async def delete_older_than(s: AsyncSession, cutoff: datetime, limit: int) -> int:
    """Delete at most `limit` stored turns created before `cutoff` (oldest first); how many."""
    ids = list(
        await s.scalars(
            select(Message.id).where(Message.created_at < cutoff).order_by(Message.id).limit(limit)
        )
    )
    return await delete_messages(s, ids)


async def delete_pending_older_than(s: AsyncSession, cutoff: datetime) -> int:
    result = await s.execute(delete(PendingMessage).where(PendingMessage.received_at < cutoff))
    return result.rowcount or 0


async def guild_channels(s: AsyncSession, guild_id: int) -> list[Channel]:
    query = select(Channel).where(Channel.guild_id == guild_id).order_by(Channel.id)
    return list((await s.scalars(query)).all())


async def dialogue_rows(s: AsyncSession, channel_id: int) -> list[Message]:
    """Every finished, remembered turn of a channel, oldest first (for training exports)."""
    query = (
        select(Message)
        .where(
            Message.channel_id == channel_id,
            Message.forgotten.is_(False),
            Message.status == Status.COMPLETE,
        )
        .order_by(Message.id)
    )
    return list((await s.scalars(query)).all())


async def set_persona(s: AsyncSession, channel_id: int, persona: str | None) -> None:
    await s.execute(update(Channel).where(Channel.id == channel_id).values(persona=persona))


async def set_autoreply(
    s: AsyncSession, channel_id: int, enabled: bool, *, threads: bool = False
) -> None:
    """Answer every message of the channel (`threads`: each answer in a new thread)."""
    values = {"autoreply": enabled, "thread_replies": enabled and threads}
    await s.execute(update(Channel).where(Channel.id == channel_id).values(**values))


async def set_history_cut_noted(s: AsyncSession, channel_id: int, noted: bool) -> None:
    """Whether the channel was told that its oldest turns no longer fit the prompt."""
    await s.execute(update(Channel).where(Channel.id == channel_id).values(history_cut_noted=noted))


async def add_audit(s: AsyncSession, actor_id: int, action: str, detail: str = "") -> None:
    s.add(AuditEntry(actor_id=actor_id, action=action, detail=detail))
    await s.flush()
