"""step rollups: per-bucket summaries of a run's steps at widths 64 and 4,096, so long runs read fast

One row per (run, width, bucket = step // width): the bucket's step count, first and last step, time range and,
per scalar field and per layer of each per-layer field, the finite minimum and maximum with their steps, the
last measured value with its step, the count of non-finite values and the first step of each of NaN, +Infinity
and -Infinity. Semantics: docs/architecture.md (Storage layout). Upgrading an existing database computes the
rollups of every stored step.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Spelled here, not imported from models: a migration must not change when the models do.
REAL = sa.Float(precision=53).with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
FLOAT_ARRAY = sa.LargeBinary().with_variant(postgresql.ARRAY(postgresql.DOUBLE_PRECISION()), "postgresql")
SCALAR_FIELDS = ("loss", "grad_norm", "lr", "update_norm")
LAYER_FIELDS = ("layer_grad_norms", "layer_weight_norms", "layer_update_norms")
STATS = ("min", "max", "min_step", "max_step", "last", "last_step", "nonfinite", "nan_step", "posinf_step",
         "neginf_step")

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _scalar_columns(field: str) -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column(f"{field}_min", REAL, nullable=True, comment="smallest finite value; null when the bucket has none"),
        sa.Column(f"{field}_max", REAL, nullable=True, comment="largest finite value; null when the bucket has none"),
        sa.Column(f"{field}_min_step", sa.BigInteger(), nullable=True, comment="the (first) step of the minimum"),
        sa.Column(f"{field}_max_step", sa.BigInteger(), nullable=True, comment="the (first) step of the maximum"),
        sa.Column(f"{field}_last", REAL, nullable=True,
                  comment="the value at the highest step that measured it (NaN, ±Inf too)"),
        sa.Column(f"{field}_last_step", sa.BigInteger(), nullable=True),
        sa.Column(f"{field}_nonfinite", sa.Integer(), server_default="0", nullable=False,
                  comment="NaN, +Inf and -Inf"),
        sa.Column(f"{field}_nan_step", sa.BigInteger(), nullable=True, comment="the first step whose value is NaN"),
        sa.Column(f"{field}_posinf_step", sa.BigInteger(), nullable=True,
                  comment="the first step whose value is +Infinity"),
        sa.Column(f"{field}_neginf_step", sa.BigInteger(), nullable=True,
                  comment="the first step whose value is -Infinity"),
    ]


def upgrade() -> None:
    op.create_table(
        "step_rollups",
        sa.Column("run_pk", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False, comment="steps per bucket: one of ROLLUP_WIDTHS"),
        sa.Column("bucket", sa.BigInteger(), nullable=False, comment="step // width"),
        sa.Column("n", sa.Integer(), nullable=False, comment="steps stored in the bucket"),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("time_min", sa.Float(precision=53), nullable=False, comment="unix seconds"),
        sa.Column("time_max", sa.Float(precision=53), nullable=False, comment="unix seconds"),
        *[c for f in SCALAR_FIELDS for c in _scalar_columns(f)],
        *[sa.Column(f"{f}_{stat}", FLOAT_ARRAY, nullable=True, comment=f"per layer: as {stat} of a scalar field")
          for f in LAYER_FIELDS for stat in STATS],
        sa.ForeignKeyConstraint(["run_pk"], ["runs.id"], name=op.f("fk_step_rollups_run_pk_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_pk", "width", "bucket", name=op.f("pk_step_rollups")),
        comment="per-bucket summaries of steps at each width, maintained in the ingest transaction (rollups.py)",
        sqlite_with_rowid=False,
    )
    _backfill()


def _backfill() -> None:
    """Every stored run's rollups, computed from its steps by the service's own maintenance code (the one
    definition of what a rollup holds). Should a later revision change step_rollups, this must then be frozen
    to the columns this revision creates."""
    from gradwatch_service.storage.models import runs
    from gradwatch_service.storage.rollups import catch_up_rollups

    conn = op.get_bind()
    for run_pk, layer_names in conn.execute(sa.select(runs.c.id, runs.c.layer_names).order_by(runs.c.id)).all():
        catch_up_rollups(conn, int(run_pk), len(layer_names or []))


def downgrade() -> None:
    op.drop_table("step_rollups")
