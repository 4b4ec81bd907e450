"""Typed ORM models: channels, messages, inbox, settings, access, privacy, audit log."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Discord ids are 64-bit; autoincrement keys must be INTEGER on SQLite to alias the rowid.
RowId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class SafeText(TypeDecorator[str]):
    """Text that PostgreSQL accepts whatever a model generated: NUL characters (which its text
    type refuses, and random or small models do emit) are stored there as U+FFFD; SQLite keeps
    them as they are."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or dialect.name != "postgresql":
            return value
        return value.replace("\x00", "\ufffd")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them without the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one (datetime.now(UTC))")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class Status(StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"


class EnumString(TypeDecorator[StrEnum]):
    """A StrEnum stored as its value in a short string column (read back as the enum)."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum: type[StrEnum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: StrEnum | str | None, dialect: Dialect) -> str | None:
        return None if value is None else str(value)  # CHECK constraints refuse unknown values

    def process_result_value(self, value: str | None, dialect: Dialect) -> StrEnum | None:
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Channel(Base):
    """A Discord channel (or DM, or the console's own channel) the bot has talked in."""

    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    autoreply: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # answers to messages in this channel go into a new thread each (auto-reply's thread mode)
    thread_replies: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # the conversation was told once that its oldest turns no longer fit (reset by /forget)
    history_cut_noted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    persona: Mapped[str | None] = mapped_column(SafeText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    settings: Mapped[ChannelSettingsRow | None] = relationship(
        back_populates="channel", cascade="all, delete-orphan", passive_deletes=True
    )


class Message(Base):
    """One turn: a user's message or the bot's reply (maybe split over several Discord messages)."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant', 'system')", name="role"),
        CheckConstraint("status IN ('in_progress', 'complete', 'interrupted')", name="status"),
        Index("ix_messages_channel_history", "channel_id", "forgotten", "id"),
        Index("ix_messages_status", "status"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("channels.id", ondelete="CASCADE"), nullable=False
    )
    discord_message_id: Mapped[int | None] = mapped_column(BigInteger, index=True)  # the first
    discord_message_ids: Mapped[list[int]] = mapped_column(JSON, default=list)  # all, in order
    author_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    author_name: Mapped[str] = mapped_column(String(100), default="")
    role: Mapped[Role] = mapped_column(EnumString(Role), nullable=False)
    content: Mapped[str] = mapped_column(SafeText, default="")
    token_count: Mapped[int | None] = mapped_column(Integer)  # of content (reply: generated)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)  # reply only: the prompt it saw
    model_version: Mapped[str | None] = mapped_column(String(200))  # NAME@N
    queue_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[Status] = mapped_column(EnumString(Status), default=Status.COMPLETE)
    forgotten: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, onupdate=utcnow)


class PendingMessage(Base):
    """A message the bot accepted and has not started answering: stored the moment it is
    accepted, moved into `messages` when its channel's turn comes. What is left here after a
    crash is what was accepted and never answered."""

    __tablename__ = "inbox"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("channels.id", ondelete="CASCADE"), nullable=False, index=True
    )
    discord_message_id: Mapped[int | None] = mapped_column(BigInteger)
    author_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    author_name: Mapped[str] = mapped_column(String(100), default="")
    content: Mapped[str] = mapped_column(SafeText, default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # the bot's "in line" placeholder, shown while the message waited (its answer edits it)
    held_message_id: Mapped[int | None] = mapped_column(BigInteger)


class GenerationColumns:
    """The generation overrides a channel or a server may set; NULL means: not set here."""

    temperature: Mapped[float | None] = mapped_column(Float)
    top_p: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[int | None] = mapped_column(Integer)
    # named as the engine's fields; the columns keep the names the first migration gave them
    max_new_tokens: Mapped[int | None] = mapped_column("max_tokens", Integer)
    repetition_penalty: Mapped[float | None] = mapped_column(Float)
    no_repeat_ngram_size: Mapped[int | None] = mapped_column("no_repeat_ngram", Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    updated_by: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ChannelSettingsRow(GenerationColumns, Base):
    """Per-channel generation overrides; NULL means the server's default, else the model's."""

    __tablename__ = "channel_settings"

    channel_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True
    )

    channel: Mapped[Channel] = relationship(back_populates="settings")


class Editors(StrEnum):
    """Who may change a server's settings or personas."""

    EVERYONE = "everyone"
    MANAGERS = "managers"


class GuildSettingsRow(GenerationColumns, Base):
    """Per-server generation defaults for its channels, and who may change settings/personas."""

    __tablename__ = "guild_settings"
    __table_args__ = (
        CheckConstraint("settings_editors IN ('everyone', 'managers')", name="settings_editors"),
        CheckConstraint("persona_editors IN ('everyone', 'managers')", name="persona_editors"),
    )

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    settings_editors: Mapped[str] = mapped_column(
        String(16), default=Editors.EVERYONE, server_default=Editors.EVERYONE.value
    )
    persona_editors: Mapped[str] = mapped_column(
        String(16), default=Editors.MANAGERS, server_default=Editors.MANAGERS.value
    )


class AccessRule(Base):
    """One allow or deny entry of a server's access lists: a channel, a role or a user."""

    __tablename__ = "access_rules"
    __table_args__ = (
        CheckConstraint("kind IN ('channel', 'role', 'user')", name="kind"),
        CheckConstraint("effect IN ('allow', 'deny')", name="effect"),
        UniqueConstraint("guild_id", "kind", "target_id"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    target_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    effect: Mapped[str] = mapped_column(String(8), nullable=False)
    created_by: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UserPrivacy(Base):
    """A user's privacy choice, for every server and DM: opted out of storage and exports."""

    __tablename__ = "user_privacy"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class AuditEntry(Base):
    """An admin or moderator action: who, what, details, when."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    actor_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    detail: Mapped[str] = mapped_column(SafeText, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FinetuneJob(Base):
    """A fine-tuning job (bot/finetune): a server's dialogues -> training -> a new version."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'finished', 'failed', 'cancelled')", name="status"
        ),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    status: Mapped[JobStatus] = mapped_column(
        EnumString(JobStatus), default=JobStatus.QUEUED, index=True
    )
    guild_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    channel_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_by: Mapped[int] = mapped_column(BigInteger, nullable=False)
    progress_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # channels, steps, method
    phase: Mapped[str] = mapped_column(String(32), default="queued")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    figures: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(SafeText, nullable=True)
    result_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
