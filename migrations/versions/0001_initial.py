"""initial schema: projects, runs, steps

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Column types spelled per dialect here, not imported from models: a migration must not change when the
# models do. REAL keeps NaN on SQLite by storing the text 'NaN' (see gradwatch_service.storage.dialect).
REAL = sa.Float(precision=53).with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
FLOAT_ARRAY = sa.LargeBinary().with_variant(postgresql.ARRAY(postgresql.DOUBLE_PRECISION()), "postgresql")
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("name", name=op.f("uq_projects_name")),
    )
    op.create_table(
        "runs",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False, comment="the client-chosen public id"),
        sa.Column("project_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("config", JSON_DOC, nullable=True),
        sa.Column("meta", JSON_DOC, nullable=True),
        sa.Column("layer_names", JSON_DOC, nullable=False, comment="order of the per-layer arrays in steps"),
        sa.Column("last_step", sa.BigInteger(), nullable=True),
        sa.Column("n_steps", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "detector_state",
            JSON_DOC,
            nullable=True,
            comment="incremental detector state, advanced under the row lock",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_runs_project_id_projects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("run_id", name=op.f("uq_runs_run_id")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_runs_project_id_updated_at"), ["project_id", "updated_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_runs_updated_at"), ["updated_at"], unique=False)

    op.create_table(
        "steps",
        sa.Column("run_pk", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("time", sa.Float(precision=53), nullable=False, comment="unix seconds"),
        sa.Column("loss", REAL, nullable=True),
        sa.Column("grad_norm", REAL, nullable=True, comment="total L2 norm of the gradients before clipping"),
        sa.Column("lr", REAL, nullable=True),
        sa.Column("update_norm", REAL, nullable=True),
        sa.Column(
            "flags", sa.SmallInteger(), server_default="0", nullable=False, comment="1 skipped, 2 late"
        ),
        sa.Column("layer_grad_norms", FLOAT_ARRAY, nullable=True),
        sa.Column("layer_weight_norms", FLOAT_ARRAY, nullable=True),
        sa.Column("layer_update_norms", FLOAT_ARRAY, nullable=True),
        sa.Column("scalars", JSON_DOC, nullable=True),
        sa.ForeignKeyConstraint(
            ["run_pk"], ["runs.id"], name=op.f("fk_steps_run_pk_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_pk", "step", name=op.f("pk_steps")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("steps")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_updated_at"))
        batch_op.drop_index(batch_op.f("ix_runs_project_id_updated_at"))

    op.drop_table("runs")
    op.drop_table("projects")
