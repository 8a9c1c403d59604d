"""index on lower(email) of users, for inbound webhooks matched by email

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_users_email_lower", "users", [sa.text("lower(email)")], unique=False)


def downgrade() -> None:
    op.drop_index("ix_users_email_lower", table_name="users")
