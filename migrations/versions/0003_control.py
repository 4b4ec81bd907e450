"""Control and privacy: server settings and editors, access lists, opt-outs, retention indexes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "guild_settings",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column(
            "settings_editors", sa.String(length=16), server_default="everyone", nullable=False
        ),
        sa.Column(
            "persona_editors", sa.String(length=16), server_default="managers", nullable=False
        ),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("top_p", sa.Float(), nullable=True),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("repetition_penalty", sa.Float(), nullable=True),
        sa.Column("no_repeat_ngram", sa.Integer(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("updated_by", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "settings_editors IN ('everyone', 'managers')",
            name=op.f("ck_guild_settings_settings_editors"),
        ),
        sa.CheckConstraint(
            "persona_editors IN ('everyone', 'managers')",
            name=op.f("ck_guild_settings_persona_editors"),
        ),
        sa.PrimaryKeyConstraint("guild_id", name=op.f("pk_guild_settings")),
    )
    op.create_table(
        "access_rules",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("target_id", sa.BigInteger(), nullable=False),
        sa.Column("effect", sa.String(length=8), nullable=False),
        sa.Column("created_by", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('channel', 'role', 'user')", name=op.f("ck_access_rules_kind")
        ),
        sa.CheckConstraint("effect IN ('allow', 'deny')", name=op.f("ck_access_rules_effect")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_rules")),
        sa.UniqueConstraint(
            "guild_id", "kind", "target_id", name=op.f("uq_access_rules_guild_id_kind_target_id")
        ),
    )
    op.create_index(op.f("ix_access_rules_guild_id"), "access_rules", ["guild_id"], unique=False)
    op.create_table(
        "user_privacy",
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("opted_out", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_privacy")),
    )
    # forget-me and export find a user's rows; retention finds old ones
    op.create_index(op.f("ix_messages_author_id"), "messages", ["author_id"], unique=False)
    op.create_index(op.f("ix_messages_created_at"), "messages", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_created_at"), table_name="messages")
    op.drop_index(op.f("ix_messages_author_id"), table_name="messages")
    op.drop_table("user_privacy")
    op.drop_index(op.f("ix_access_rules_guild_id"), table_name="access_rules")
    op.drop_table("access_rules")
    op.drop_table("guild_settings")
