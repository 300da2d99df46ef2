"""Schema migrations as functions: the CLI, the start-up check and the tests all come through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Column, Engine
from sqlalchemy.types import TypeDecorator

import gradwatch_service.migrations as _migrations_pkg

MIGRATIONS_DIR = Path(_migrations_pkg.__file__).parent


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def _run(engine: Engine, fn: Any, *args: Any) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        fn(cfg, *args)


def upgrade(engine: Engine, revision: str = "head") -> None:
    _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    _run(engine, command.downgrade, revision)


def _scripts() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str | None:
    return _scripts().get_current_head()


def known_revision(revision: str) -> bool:
    """Whether this gradwatch's migrations include `revision` (a newer gradwatch's are unknown to it)."""
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_problem(engine: Engine) -> str | None:
    """None when the database schema is current, else a sentence that says which command fixes it."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return None
    if current is not None and not known_revision(current):
        return (f"database schema is at revision {current}, which this gradwatch (head {head}) does not know: a "
                "newer gradwatch has migrated it; run that version (docs/deploy.md, Upgrades)")
    return (
        f"database schema is at revision {current or 'none (empty database)'}, this gradwatch needs {head}: "
        f"run `gradwatch db upgrade` (database: {engine.url.render_as_string(hide_password=True)})"
    )


def compare_type(context: Any, inspected_column: Any, metadata_column: Any, inspected_type: Any,
                 metadata_type: Any) -> bool | None:
    """Compare our dialect-dependent TypeDecorators by the type they become on this database."""
    if isinstance(metadata_type, TypeDecorator):
        dialect = context.dialect
        impl = metadata_type.load_dialect_impl(dialect)
        differs: bool = context.impl.compare_type(inspected_column, _with_type(metadata_column, impl))
        return differs
    return None


def _with_type(column: Any, type_: Any) -> Any:
    return Column(column.name, type_, nullable=column.nullable)
