"""Prediction records, the classes of each recording model, and examiners' corrections.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_models",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("registered_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("text_sha256", sa.String(64), nullable=False),
        sa.Column("text", sa.Text),
        sa.Column("document", sa.JSON),
        sa.Column("top_label", sa.String(128), nullable=False),
        sa.Column("top_labels", sa.JSON, nullable=False),
        sa.Column("top_probabilities", sa.JSON, nullable=False),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False),
    )
    op.create_index("ix_predictions_model_created_at", "predictions", ["model", "created_at"])
    op.create_table(
        "feedback",
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("correct_label", sa.String(128), nullable=False),
        sa.Column("examiner_id", sa.String(128)),
        sa.Column("comment", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_feedback_model_created_at", "feedback", ["model", "created_at"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("predictions")
    op.drop_table("served_models")
