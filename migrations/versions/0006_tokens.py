"""tokens: `api_tokens`, the bearer tokens that guard the API (stored as SHA-256 hashes), out of the reader's sight

The `gradwatch_reader` role (0004) may SELECT every table of the schema by default privileges; it is refused
this one, so a dashboard login cannot even read token hashes and names.

Revision ID: 0006
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
READER_ROLE = "gradwatch_reader"

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("token_id", sa.String(length=16), nullable=False, comment="the public part of the token, for lookup"),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=True,
                  comment="the one project this token may touch; every project when null"),
        sa.Column("scopes", sa.String(length=64), nullable=False, comment="space-separated: ingest, read, admin"),
        sa.Column("secret_hash", sa.String(length=64), nullable=False,
                  comment="SHA-256 of the whole token, hex; never the token"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_id", name=op.f("uq_api_tokens_token_id")),
    )
    op.create_index(op.f("ix_api_tokens_revoked_at"), "api_tokens", ["revoked_at"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"REVOKE ALL ON api_tokens FROM {READER_ROLE}")


def downgrade() -> None:
    op.drop_index(op.f("ix_api_tokens_revoked_at"), table_name="api_tokens")
    op.drop_table("api_tokens")
