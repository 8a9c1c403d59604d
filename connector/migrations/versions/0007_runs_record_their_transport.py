"""runs record their transport and how many users their batch requests carried; the
claim's order and the webhook users' status are indexes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Runs recorded before this revision made v1 calls only.
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("transport", sa.String(length=10), nullable=False, server_default="single")
        )
        batch_op.add_column(
            sa.Column("batch_requests", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("batch_users", sa.Integer(), nullable=False, server_default="0")
        )
    # A claim takes the oldest pending users: without it, each claim sorts all of them.
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(
            "ix_users_claim_order", ["pending", "pending_since", "id"], unique=False
        )
        # Storing a notification looks for the few webhook users it takes over by status.
        batch_op.create_index("ix_users_sync_status", ["sync_status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index("ix_users_sync_status")
        batch_op.drop_index("ix_users_claim_order")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("batch_users")
        batch_op.drop_column("batch_requests")
        batch_op.drop_column("transport")
