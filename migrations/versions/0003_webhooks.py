"""webhooks: subscriptions, the delivery outbox and its attempt log

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
REAL = sa.Float(precision=53)

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_subscriptions",
        sa.Column("id", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False, comment="the Alertmanager body's receiver"),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=True,
                  comment="only this project's incidents; every project when null"),
        sa.Column("min_severity", sa.String(length=16), nullable=False, comment="warning (all) or critical"),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("secret", sa.String(length=128), nullable=False,
                  comment="whsec_...: signs every delivery, shown once"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_subscriptions")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("subscription_id", BIG_KEY, nullable=False),
        sa.Column("msg_id", sa.String(length=64), nullable=False,
                  comment="webhook-id: one per event, the same on every attempt"),
        sa.Column("event", sa.String(length=16), nullable=False, comment="firing or resolved"),
        sa.Column("incident", sa.String(length=200), nullable=False, comment="run_id#seq"),
        sa.Column("payload", JSON_DOC, nullable=False, comment="the incident as it was when the event happened"),
        sa.Column("state", sa.String(length=16), nullable=False, comment="pending, delivered or dead"),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False,
                  comment="due time, or the end of a worker's lease while it sends"),
        sa.Column("retry_from", sa.DateTime(timezone=True), nullable=False,
                  comment="retries are counted from here: creation or the last manual resend"),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["subscription_id"], ["webhook_subscriptions.id"],
                                name=op.f("fk_webhook_deliveries_subscription_id_webhook_subscriptions"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(op.f("ix_webhook_deliveries_state_next_attempt_at"), "webhook_deliveries",
                    ["state", "next_attempt_at"], unique=False)
    op.create_index(op.f("ix_webhook_deliveries_subscription_id_id"), "webhook_deliveries",
                    ["subscription_id", "id"], unique=False)
    op.create_table(
        "webhook_attempts",
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False, comment="1, 2, ... within the delivery"),
        sa.Column("outcome", sa.String(length=16), nullable=False, comment="delivered, failed (will retry) or dead"),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", REAL, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["delivery_id"], ["webhook_deliveries.id"],
                                name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("delivery_id", "attempt", name=op.f("pk_webhook_attempts")),
    )


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_index(op.f("ix_webhook_deliveries_subscription_id_id"), table_name="webhook_deliveries")
    op.drop_index(op.f("ix_webhook_deliveries_state_next_attempt_at"), table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_subscriptions")
