"""The schema property that distributing by run relies on (docs/deploy.md, "Past one database node").

Citus hash-distributes a table by one column, and can enforce a primary key, a unique constraint or a foreign key
between distributed tables only when it includes that column, so that each check stays on one shard. Every table
that holds run data (found by its `run_pk` column, so a table added later is covered without editing this test)
must therefore have `run_pk` first in its primary key, in every unique constraint, and in every foreign key to run
data, paired with the run key on the other side. The tables without it (projects, runs, the webhook tables) become
reference tables, copied to every node; a reference table may not point at a distributed one.

Checked on the models and on the schema the migrations build, on both databases, so a later migration that
breaks the property fails here rather than on the day someone distributes the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    Table,
    UniqueConstraint,
    inspect,
)

from gradwatch_service.storage.models import metadata

RUN_KEY = "run_pk"
RUNS = "runs"  # its `id` is the run key every run_pk refers to


@dataclass
class Keys:
    """One table's columns and keys, read from the models or from a database."""

    columns: dict[str, str]  # name -> type, as the database or the model spells it
    primary_key: list[str]
    foreign_keys: list[tuple[list[str], str, list[str]]] = field(default_factory=list)  # columns, table, columns
    unique: list[list[str]] = field(default_factory=list)  # unique constraints and unique indexes


def keys_of_metadata(md: MetaData) -> dict[str, Keys]:
    tables: dict[str, Keys] = {}
    for t in md.sorted_tables:
        keys = Keys({c.name: type(c.type).__name__ for c in t.columns}, [c.name for c in t.primary_key.columns])
        for fk in t.foreign_key_constraints:
            keys.foreign_keys.append(([c.name for c in fk.columns], fk.referred_table.name,
                                      [e.column.name for e in fk.elements]))
        keys.unique += [[c.name for c in i.columns] for i in t.indexes if i.unique]
        keys.unique += [[c.name for c in u.columns] for u in t.constraints
                        if isinstance(u, UniqueConstraint)]  # Column(unique=True) makes one too
        tables[t.name] = keys
    return tables


def keys_of_database(engine: Engine) -> dict[str, Keys]:
    insp = inspect(engine)
    tables: dict[str, Keys] = {}
    for name in insp.get_table_names():
        if name == "alembic_version":
            continue
        keys = Keys({c["name"]: str(c["type"]) for c in insp.get_columns(name)},
                    list(insp.get_pk_constraint(name)["constrained_columns"]))
        for fk in insp.get_foreign_keys(name):
            keys.foreign_keys.append((list(fk["constrained_columns"]), fk["referred_table"],
                                      list(fk["referred_columns"])))
        keys.unique += [list(u["column_names"]) for u in insp.get_unique_constraints(name)]
        keys.unique += [[str(c) for c in i["column_names"]] for i in insp.get_indexes(name) if i["unique"]]
        tables[name] = keys
    return tables


def distribution_problems(tables: dict[str, Keys], compare_types: bool = True) -> list[str]:
    """What keeps these tables from being distributed by run, one sentence each; empty when nothing does.
    (`compare_types` off for SQLite, whose integer key is INTEGER to be the rowid: it is never distributed.)"""
    distributed = {name for name, t in tables.items() if RUN_KEY in t.columns}
    problems = []
    run_key_type = tables[RUNS].columns["id"]
    for name in sorted(distributed):
        t = tables[name]
        if t.primary_key[:1] != [RUN_KEY]:
            problems.append(f"{name}: primary key {t.primary_key} does not start with {RUN_KEY}")
        # colocated shards need one type of distribution column
        if compare_types and t.columns[RUN_KEY] != run_key_type:
            problems.append(f"{name}.{RUN_KEY} is {t.columns[RUN_KEY]}, {RUNS}.id is {run_key_type}")
        for cols, target, target_cols in t.foreign_keys:
            if target != RUNS and target not in distributed:
                continue  # to a reference table: allowed
            wanted = "id" if target == RUNS else RUN_KEY
            if RUN_KEY not in cols or target_cols[cols.index(RUN_KEY)] != wanted:
                problems.append(f"{name}: foreign key {cols} -> {target}{target_cols} does not pair {RUN_KEY} "
                                f"with {target}.{wanted}")
        for unique in t.unique:
            if RUN_KEY not in unique:
                problems.append(f"{name}: unique {unique} does not include {RUN_KEY}")
    for name in sorted(set(tables) - distributed):
        for cols, target, _ in tables[name].foreign_keys:
            if target in distributed:
                problems.append(f"{name} (a reference table) has a foreign key {cols} to {target}, which is "
                                "distributed")
    return problems


def test_the_models_can_be_distributed_by_run() -> None:
    tables = keys_of_metadata(metadata)
    assert {"steps", "incidents"} <= {n for n, t in tables.items() if RUN_KEY in t.columns}
    assert distribution_problems(tables) == []


def test_the_migrated_schema_can_be_distributed_by_run(engine: Engine) -> None:
    tables = keys_of_database(engine)
    assert set(tables) == set(metadata.tables)
    assert distribution_problems(tables, compare_types=engine.dialect.name == "postgresql") == []


def test_each_way_of_breaking_the_property_is_named() -> None:
    broken = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(broken)
    Table("samples", broken, Column("id", BigInteger, primary_key=True),  # run data keyed by something else
          Column(RUN_KEY, ForeignKey("runs.id"), nullable=False), Column("at", Integer, unique=True))
    Table("marks", broken, Column(RUN_KEY, BigInteger, primary_key=True), Column("seq", Integer, primary_key=True),
          ForeignKeyConstraint(["seq", RUN_KEY], ["incidents.run_pk", "incidents.seq"]))
    Table("notes", broken, Column("id", BigInteger, primary_key=True), Column("run", BigInteger),
          Column("step", BigInteger), ForeignKeyConstraint(["run", "step"], ["steps.run_pk", "steps.step"]))
    Table("tallies", broken, Column(RUN_KEY, Integer, ForeignKey("runs.id"), primary_key=True))
    assert distribution_problems(keys_of_metadata(broken)) == [
        "marks: foreign key ['seq', 'run_pk'] -> incidents['run_pk', 'seq'] does not pair run_pk with incidents.run_pk",
        "samples: primary key ['id'] does not start with run_pk",
        "samples: unique ['at'] does not include run_pk",
        "tallies.run_pk is Integer, runs.id is BigInteger",
        "notes (a reference table) has a foreign key ['run', 'step'] to steps, which is distributed",
    ]
