"""reader role: `gradwatch_reader`, SELECT on this schema's tables, now and later (PostgreSQL only)

Dashboards (Grafana's PostgreSQL data source) read through a login that is a member of this role and can change
nothing. The role is NOLOGIN and has no password: the deployment creates the login and grants it the role
(deploy/postgres/, docs/deploy.md). Roles are cluster-wide, so several schemas (or test schemas) may share it;
downgrading revokes this schema's grants and leaves the role, which other schemas may still use.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

READER_ROLE = "gradwatch_reader"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # Two migrations racing to create the role (replicas, parallel tests) both succeed.
    op.execute(f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                CREATE ROLE {READER_ROLE} NOLOGIN;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$
    """)
    op.execute(f"""
        DO $$ BEGIN
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO {READER_ROLE}', current_schema());
            EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO {READER_ROLE}', current_schema());
            EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO {READER_ROLE}',
                           current_schema());
        END $$
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
        DO $$ BEGIN
            EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE SELECT ON TABLES FROM {READER_ROLE}',
                           current_schema());
            EXECUTE format('REVOKE SELECT ON ALL TABLES IN SCHEMA %I FROM {READER_ROLE}', current_schema());
            EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM {READER_ROLE}', current_schema());
        END $$
    """)
