"""The storage dialect layer is the one place that knows which database it is on: outside dialect.py, only the
engine factory (storage/db.make_engine) compares a database kind's name, and each dialect binds, reads and writes the
values the design promises to keep (NaN, ±Infinity, "not measured") the same way back."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from gradwatch_service.storage.dialect import PostgreSQL, SQLite, StorageDialect, dialect_named, storage_dialect

SERVICE = Path(__file__).resolve().parents[2] / "service" / "gradwatch_service"
KINDS = {"sqlite", "postgresql"}


def _is_kind_name(node: ast.AST) -> bool:
    """A database kind's name: the literal, or `<...>.dialect.name` / `dialect.name`."""
    if isinstance(node, ast.Constant) and node.value in KINDS:
        return True
    if isinstance(node, ast.Attribute) and node.attr == "name":
        owner = node.value
        return (isinstance(owner, ast.Attribute) and owner.attr == "dialect") or \
            (isinstance(owner, ast.Name) and owner.id == "dialect")
    return False


def _branches_on_kind(path: Path) -> list[int]:
    """Lines comparing a database kind's name (==, !=, in), or calling get_backend_name() in a comparison."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(_is_kind_name(n) for n in (node.left, *node.comparators)):
            lines.append(node.lineno)
    return lines


def test_only_the_dialect_layer_and_the_engine_factory_branch_on_the_database_kind() -> None:
    found = {str(p.relative_to(SERVICE)): lines for p in sorted(SERVICE.rglob("*.py"))
             if p != SERVICE / "storage" / "dialect.py" and (lines := _branches_on_kind(p))}
    assert set(found) <= {"storage/db.py"}, found
    tree = ast.parse((SERVICE / "storage" / "db.py").read_text())
    factory = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "make_engine")
    assert all(factory.lineno <= line <= (factory.end_lineno or 0) for line in found.get("storage/db.py", [])), found


def test_the_counter_sees_a_branch() -> None:
    probe = SERVICE.parent.parent / "tests" / "service" / "test_dialect.py"  # this file compares on purpose
    assert _branches_on_kind(probe)
    assert 'conn.dialect.name == "postgresql"' in probe.read_text()  # the kind of line it must catch


@pytest.mark.parametrize("dialect", [SQLite(), PostgreSQL()], ids=lambda d: d.name)
def test_scalars_and_arrays_come_back_as_they_were_bound(dialect: StorageDialect) -> None:
    column = [0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, None, 5e-324]
    back = [dialect.real_value(v) for v in dialect.real_params(column)]
    assert [repr(v) for v in back] == [repr(v) for v in column]
    assert [repr(dialect.real_value(dialect.real_param(v))) for v in column] == [repr(v) for v in column]
    values = [1.0, None, math.nan, -math.inf]
    assert repr(dialect.array_value(dialect.array_param(values))) == repr(values)


def test_a_sqlite_stat_array_keeps_not_measured_apart_from_nan() -> None:
    m = np.array([[1.0, math.nan, 3.0]])
    (blob,) = SQLite().stat_arrays(m.copy(), np.array([[False, False, True]]), [True])
    values, missing = SQLite().arrays_matrix([blob], 3)
    assert values[0, 0] == 1.0 and math.isnan(values[0, 1]) and missing is not None
    assert missing.tolist() == [[False, False, True]]
    assert SQLite().stat_arrays(m.copy(), np.zeros((1, 3), dtype=bool), [False]) == [None]


def test_each_engine_gets_its_dialect(engine: Engine) -> None:
    assert storage_dialect(engine) is dialect_named(engine.dialect.name)
    with engine.connect() as conn:
        assert storage_dialect(conn).name == engine.dialect.name
        if conn.dialect.name == "postgresql":
            assert isinstance(storage_dialect(conn), PostgreSQL)
