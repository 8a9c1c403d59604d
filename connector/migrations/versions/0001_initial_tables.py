"""initial tables

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "key_values",
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("instance", sa.String(length=100), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("full", sa.Boolean(), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("users_sent", sa.Integer(), nullable=False),
        sa.Column("users_skipped", sa.Integer(), nullable=False),
        sa.Column("users_deleted", sa.Integer(), nullable=False),
        sa.Column("users_failed", sa.Integer(), nullable=False),
        sa.Column("users_retrying", sa.Integer(), nullable=False),
        sa.Column("events_sent", sa.Integer(), nullable=False),
        sa.Column("api_calls", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("anonymous_ids", JSON, nullable=False),
        sa.Column("attributes", JSON, nullable=False),
        sa.Column("account", JSON, nullable=False),
        sa.Column("segments", JSON, nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("data_hash", sa.String(length=64), nullable=True),
        sa.Column("via_batch", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=100), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("full_sync", sa.Boolean(), nullable=False),
        sa.Column("sync_status", sa.String(length=20), nullable=False),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("attribute_errors", JSON, nullable=False),
        sa.Column("cio_id", sa.String(length=255), nullable=True),
        sa.Column("cio_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cio_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cio_deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cio_hash", sa.String(length=64), nullable=True),
        sa.Column("sent_attributes", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_users_email"), ["email"], unique=False)
        batch_op.create_index(batch_op.f("ix_users_external_id"), ["external_id"], unique=False)
        batch_op.create_index("ix_users_pending_next", ["pending", "next_attempt_at"], unique=False)

    op.create_table(
        "user_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("properties", JSON, nullable=False),
        sa.Column("context", JSON, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "event_id", name="uq_user_events_user_event"),
    )
    with op.batch_alter_table("user_events", schema=None) as batch_op:
        batch_op.create_index("ix_user_events_user_status", ["user_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("user_events", schema=None) as batch_op:
        batch_op.drop_index("ix_user_events_user_status")

    op.drop_table("user_events")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index("ix_users_pending_next")
        batch_op.drop_index(batch_op.f("ix_users_external_id"))
        batch_op.drop_index(batch_op.f("ix_users_email"))

    op.drop_table("users")
    op.drop_table("sync_runs")
    op.drop_table("key_values")
