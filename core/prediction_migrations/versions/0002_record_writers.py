"""Records writers' watermarks: what each classifier's journal has stored, and when it was last seen.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "record_writers",
        sa.Column("writer", sa.String(512), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("replica", sa.String(253), nullable=False),
        sa.Column("written_through_ms", sa.BigInteger, nullable=False),
        sa.Column("heartbeat_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("record_writers")
