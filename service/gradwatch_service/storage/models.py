"""The schema: projects own runs, runs own steps. One row per step; per-layer values packed in that row.

Every table holding run data has the run's key in its primary key, so the schema can later be distributed by
run (Citus) or partitioned, and a run's steps are one contiguous range of the primary key.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS

from .dialect import dialect_named

__all__ = ["metadata", "projects", "runs", "steps", "step_rollups", "ROLLUP_WIDTHS", "ROLLUP_SCALAR_STATS",
           "ROLLUP_LAYER_STATS", "incidents", "webhook_subscriptions", "webhook_deliveries", "webhook_attempts",
           "api_tokens", "Real", "FloatArray", "JsonDoc"]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Real(TypeDecorator[float]):
    """A float64 that keeps NaN on every database, as the storage dialect binds and reads it (dialect.py)."""

    impl = Float(precision=53)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(dialect_named(dialect.name).real_type())

    def bind_processor(self, dialect: Dialect) -> Any:
        # Not process_bind_param: on SQLite the float type's own bind processor (float(x)) would run after it
        # and turn the text 'NaN' back into a NaN, which SQLite stores as NULL.
        return dialect_named(dialect.name).real_param

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return dialect_named(dialect.name).real_value(value)


class FloatArray(TypeDecorator[list[float | None]]):
    """Per-layer values: `double precision[]` on PostgreSQL (dashboards query it), a float64 blob on SQLite."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(dialect_named(dialect.name).array_type())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else dialect_named(dialect.name).array_param(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else dialect_named(dialect.name).array_value(value)


def JsonDoc() -> TypeEngine[Any]:
    """JSON documents: JSONB on PostgreSQL (indexable, `->>` in dashboards), JSON text elsewhere."""
    return JSON().with_variant(postgresql.JSONB(), "postgresql")


def _BigKey() -> TypeEngine[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
    return BigInteger().with_variant(Integer(), "sqlite")


projects = Table(
    "projects",
    metadata,
    Column("id", _BigKey(), primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

runs = Table(
    "runs",
    metadata,
    Column("id", _BigKey(), primary_key=True, autoincrement=True),
    Column("run_id", String(128), nullable=False, unique=True, comment="the client-chosen public id"),
    Column("project_id", ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(256)),
    Column("status", String(16), nullable=False),
    Column("config", JsonDoc()),
    Column("meta", JsonDoc()),
    Column("layer_names", JsonDoc(), nullable=False, comment="order of the per-layer arrays in steps"),
    Column("last_step", BigInteger),
    Column("n_steps", BigInteger, nullable=False, server_default="0"),
    Column("detector_state", JsonDoc(), comment="incremental detector state, advanced under the row lock"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "project_id", "updated_at"),
    Index(None, "updated_at"),
)

_STEP_COMMENTS = {"grad_norm": "total L2 norm of the gradients before clipping"}

steps = Table(
    "steps",
    metadata,
    Column("run_pk", BigInteger, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("time", Float(precision=53), nullable=False, comment="unix seconds"),
    *[Column(name, Real(), comment=_STEP_COMMENTS.get(name)) for name in SCALAR_FIELDS],
    Column("flags", SmallInteger, nullable=False, server_default="0", comment="1 skipped, 2 late"),
    *[Column(name, FloatArray()) for name in LAYER_FIELDS],
    Column("scalars", JsonDoc()),
    sqlite_with_rowid=False,
)

ROLLUP_WIDTHS = (64, 256, 1024, 4096, 16384)
"""The bucket widths (in steps) of step_rollups' levels, finest first, each four times the one before: a read
of n points finds a level with between n/2 and 2n buckets in it (docs/architecture.md, Storage layout)."""
ROLLUP_SCALAR_STATS = ("min", "max", "min_step", "max_step", "last", "last_step", "nonfinite", "nan_step",
                       "posinf_step", "neginf_step")
"""The columns step_rollups keeps per scalar field (`loss_min`, ...), see step_rollups."""
ROLLUP_LAYER_STATS = ROLLUP_SCALAR_STATS
"""The same statistics per per-layer field, each an array in the order of runs.layer_names."""


def _rollup_scalar_columns(field: str) -> list[Column[Any]]:
    return [
        Column(f"{field}_min", Real(), comment="smallest finite value; null when the bucket has none"),
        Column(f"{field}_max", Real(), comment="largest finite value; null when the bucket has none"),
        Column(f"{field}_min_step", BigInteger, comment="the (first) step of the minimum"),
        Column(f"{field}_max_step", BigInteger, comment="the (first) step of the maximum"),
        Column(f"{field}_last", Real(), comment="the value at the highest step that measured it (NaN, ±Inf too)"),
        Column(f"{field}_last_step", BigInteger),
        Column(f"{field}_nonfinite", Integer, nullable=False, server_default="0", comment="NaN, +Inf and -Inf"),
        Column(f"{field}_nan_step", BigInteger, comment="the first step whose value is NaN"),
        Column(f"{field}_posinf_step", BigInteger, comment="the first step whose value is +Infinity"),
        Column(f"{field}_neginf_step", BigInteger, comment="the first step whose value is -Infinity"),
    ]


def _rollup_layer_columns(field: str) -> list[Column[Any]]:
    return [Column(f"{field}_{stat}", FloatArray(), comment=f"per layer: as {stat} of a scalar field")
            for stat in ROLLUP_LAYER_STATS]


step_rollups = Table(
    "step_rollups",
    metadata,
    Column("run_pk", BigInteger, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("width", Integer, primary_key=True, comment="steps per bucket: one of ROLLUP_WIDTHS"),
    Column("bucket", BigInteger, primary_key=True, comment="step // width"),
    Column("n", Integer, nullable=False, comment="steps stored in the bucket"),
    Column("first_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("time_min", Float(precision=53), nullable=False, comment="unix seconds"),
    Column("time_max", Float(precision=53), nullable=False, comment="unix seconds"),
    *[c for f in SCALAR_FIELDS for c in _rollup_scalar_columns(f)],
    *[c for f in LAYER_FIELDS for c in _rollup_layer_columns(f)],
    sqlite_with_rowid=False,
    comment="per-bucket summaries of steps at each width, maintained in the ingest transaction (rollups.py)",
)

incidents = Table(
    "incidents",
    metadata,
    Column("run_pk", BigInteger, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True, comment="1, 2, ... within the run"),
    Column("signature", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("status", String(16), nullable=False, comment="open or resolved"),
    Column("opened_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False, comment="last step the signature fired"),
    Column("resolved_step", BigInteger),
    Column("layer", String(256), comment="root cause: the layer whose norm broke out of its band first"),
    Column("value", Real()),
    Column("baseline", Real()),
    Column("message", Text, nullable=False),
    Column("evidence", JsonDoc(), comment="the step's values and the band they broke, at opening and escalation"),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
    Index(None, "status", "updated_at"),
    Index(None, "updated_at"),
)

FLAG_SKIPPED = 1
FLAG_LATE = 2

webhook_subscriptions = Table(
    "webhook_subscriptions",
    metadata,
    Column("id", _BigKey(), primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, comment="the Alertmanager body's receiver"),
    Column("url", Text, nullable=False),
    Column("project", String(128), comment="only this project's incidents; every project when null"),
    Column("min_severity", String(16), nullable=False, comment="warning (all) or critical"),
    Column("enabled", Boolean, nullable=False),
    Column("secret", String(128), nullable=False, comment="whsec_...: signs every delivery, shown once"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", _BigKey(), primary_key=True, autoincrement=True),
    Column("subscription_id", ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"), nullable=False),
    Column("msg_id", String(64), nullable=False, comment="webhook-id: one per event, the same on every attempt"),
    Column("event", String(16), nullable=False, comment="firing or resolved"),
    Column("incident", String(200), nullable=False, comment="run_id#seq"),
    Column("payload", JsonDoc(), nullable=False, comment="the incident as it was when the event happened"),
    Column("state", String(16), nullable=False, comment="pending, delivered or dead"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False,
           comment="due time, or the end of a worker's lease while it sends"),
    Column("retry_from", DateTime(timezone=True), nullable=False,
           comment="retries are counted from here: creation or the last manual resend"),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    Index(None, "state", "next_attempt_at"),
    Index(None, "subscription_id", "id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("delivery_id", BigInteger, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True),
    Column("attempt", Integer, primary_key=True, comment="1, 2, ... within the delivery"),
    Column("outcome", String(16), nullable=False, comment="delivered, failed (will retry) or dead"),
    Column("status_code", Integer),
    Column("latency_ms", Float(precision=53), nullable=False),
    Column("error", Text),
    Column("at", DateTime(timezone=True), nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", _BigKey(), primary_key=True, autoincrement=True),
    Column("token_id", String(16), nullable=False, unique=True, comment="the public part of the token, for lookup"),
    Column("name", String(128), nullable=False),
    Column("project", String(128), comment="the one project this token may touch; every project when null"),
    Column("scopes", String(64), nullable=False, comment="space-separated: ingest, read, admin"),
    Column("secret_hash", String(64), nullable=False, comment="SHA-256 of the whole token, hex; never the token"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Index(None, "revoked_at"),
)
