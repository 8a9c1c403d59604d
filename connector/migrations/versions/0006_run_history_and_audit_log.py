"""run history (held deletions, first errors of a pass) and the audit log

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Runs recorded before this revision held nothing and kept no reasons.
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("users_held", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("error_reasons", JSON, nullable=False, server_default=sa.text("'[]'"))
        )
    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=50), nullable=False),
        sa.Column("detail", JSON, nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("error_reasons")
        batch_op.drop_column("users_held")
