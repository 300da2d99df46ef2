"""incidents: what the detectors found, open or resolved, per run

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

REAL = sa.Float(precision=53).with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("run_pk", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False, comment="1, 2, ... within the run"),
        sa.Column("signature", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False, comment="open or resolved"),
        sa.Column("opened_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False, comment="last step the signature fired"),
        sa.Column("resolved_step", sa.BigInteger(), nullable=True),
        sa.Column("layer", sa.String(length=256), nullable=True,
                  comment="root cause: the layer whose norm broke out of its band first"),
        sa.Column("value", REAL, nullable=True),
        sa.Column("baseline", REAL, nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("evidence", JSON_DOC, nullable=True,
                  comment="the step's values and the band they broke, at opening and escalation"),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["run_pk"], ["runs.id"], name=op.f("fk_incidents_run_pk_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_pk", "seq", name=op.f("pk_incidents")),
    )
    op.create_index(op.f("ix_incidents_status_updated_at"), "incidents", ["status", "updated_at"], unique=False)
    op.create_index(op.f("ix_incidents_updated_at"), "incidents", ["updated_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_incidents_updated_at"), table_name="incidents")
    op.drop_index(op.f("ix_incidents_status_updated_at"), table_name="incidents")
    op.drop_table("incidents")
