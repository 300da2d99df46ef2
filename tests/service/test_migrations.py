"""Migrations: the models and the migrated schema agree, migrations go down and up, serving needs a current schema."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, inspect, text
from sqlalchemy.exc import ProgrammingError

from gradwatch_service.storage import migrate
from gradwatch_service.storage.db import make_engine
from gradwatch_service.storage.models import metadata


def _diff(engine: Engine, target: MetaData) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": migrate.compare_type, "target_metadata": target})
        return list(compare_metadata(ctx, target))


def test_autogenerate_finds_no_difference_after_upgrade(engine: Engine) -> None:
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert _diff(engine, metadata) == []


def test_the_comparison_would_notice_a_drifted_model(engine: Engine) -> None:
    drifted = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["steps"].append_column(Column("extra", Integer))
    diff = _diff(engine, drifted)
    assert any(d[0] == "add_column" and d[3].name == "extra" for d in diff)  # type: ignore[index]


def test_downgrade_to_base_and_upgrade_again(engine: Engine) -> None:
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert "run `gradwatch db upgrade`" in (migrate.schema_problem(engine) or "")
    migrate.upgrade(engine)
    assert migrate.schema_problem(engine) is None
    assert _diff(engine, metadata) == []


def test_a_schema_a_newer_gradwatch_migrated_is_not_ready_and_says_so(engine: Engine) -> None:
    """Upgrades migrate first (docs/deploy.md): replicas still on the old version must stop being ready rather
    than write to a schema they do not know, and must not tell anyone to run their own `db upgrade`."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    problem = migrate.schema_problem(engine) or ""
    assert "revision 9999, which this gradwatch" in problem and "a newer gradwatch has migrated it" in problem
    assert "run `gradwatch db upgrade`" not in problem


def test_serve_refuses_an_unmigrated_database_and_names_the_fix(database_url: str) -> None:
    env = {"GRADWATCH_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "gradwatch_service", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "gradwatch db upgrade" in done.stderr
    eng = make_engine(database_url)
    try:
        assert migrate.current_revision(eng) is None  # refusing did not touch the database
    finally:
        eng.dispose()


SECRET_TABLES = {"api_tokens"}
"""tables the reader role may not read (migration 0006): token hashes and names are nobody's dashboard"""


def test_the_reader_role_can_select_every_table_and_change_nothing(engine: Engine) -> None:
    """Dashboards read through gradwatch_reader (migration 0004): every table readable but the tokens, none
    writable."""
    if engine.dialect.name != "postgresql":
        pytest.skip("the reader role is PostgreSQL's; SQLite has no roles")
    tables = sorted(set(metadata.tables) - SECRET_TABLES)
    with engine.connect() as conn:
        conn.execute(text("SET ROLE gradwatch_reader"))
        for table in tables:
            conn.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(text("INSERT INTO projects (name) VALUES ('not-allowed')"))
        conn.rollback()


def test_the_reader_role_cannot_read_the_tokens(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the reader role is PostgreSQL's; SQLite has no roles")
    with engine.connect() as conn:
        conn.execute(text("SET ROLE gradwatch_reader"))
        for table in SECRET_TABLES:
            with pytest.raises(ProgrammingError, match="permission denied"):
                conn.execute(text(f'SELECT token_id, secret_hash FROM "{table}"'))
            conn.rollback()
            conn.execute(text("SET ROLE gradwatch_reader"))
