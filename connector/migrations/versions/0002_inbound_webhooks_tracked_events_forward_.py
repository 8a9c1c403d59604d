"""inbound webhooks, tracked events, forward outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("headers", JSON, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("event_name", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_deliveries_received", ["received_at"], unique=False)
        batch_op.create_index("ix_webhook_deliveries_status", ["status", "id"], unique=False)

    op.create_table(
        "tracked_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("object_type", sa.String(length=50), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("properties", JSON, nullable=False),
        sa.Column("context", JSON, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("cio_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("tracked_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tracked_events_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_tracked_events_user_id"), ["user_id"], unique=False)

    op.create_table(
        "forward_outbox",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("tracked_event_id", BIG_ID, nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tracked_event_id"], ["tracked_events.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tracked_event_id"),
    )
    with op.batch_alter_table("forward_outbox", schema=None) as batch_op:
        batch_op.create_index("ix_forward_outbox_due", ["status", "next_attempt_at"], unique=False)

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cio_ref", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_users_cio_id"), ["cio_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_users_cio_ref"), ["cio_ref"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_cio_ref"))
        batch_op.drop_index(batch_op.f("ix_users_cio_id"))
        batch_op.drop_column("cio_ref")

    with op.batch_alter_table("forward_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_forward_outbox_due")

    op.drop_table("forward_outbox")
    with op.batch_alter_table("tracked_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracked_events_user_id"))
        batch_op.drop_index(batch_op.f("ix_tracked_events_name"))

    op.drop_table("tracked_events")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_status")
        batch_op.drop_index("ix_webhook_deliveries_received")

    op.drop_table("webhook_deliveries")
