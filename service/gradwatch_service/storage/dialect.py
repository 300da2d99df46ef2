"""The storage dialect layer: everything that differs between SQLite and PostgreSQL, behind one small protocol.

`storage_dialect(conn)` gives the connection's `StorageDialect`, one instance per database kind (chosen by the
SQLAlchemy dialect's name, once per engine kind, in `_BY_NAME`); no other module branches on the database kind
(tests/service/test_dialect.py counts). A third database would be one more class here.

What a dialect owns:
- **values**: NaN and ±Infinity survive exactly. PostgreSQL stores them natively in `double precision` and
  `double precision[]`. SQLite stores ±Infinity in REAL but turns a NaN *parameter* into NULL, so a scalar NaN
  is stored as the text 'NaN' (REAL affinity leaves it: it is not a numeric literal) and NULL keeps meaning
  "not measured"; per-layer arrays are little-endian float64 blobs (8 bytes a value), the binary wire's own
  column format, in which "not measured" is a NaN with a payload no arithmetic produces (MISSING_BITS);
- **arrays in SQL**: one element of a stored array (`layer_grad_norms[j]` or 8 bytes of the blob), whole
  arrays read back as a matrix (array_send's binary form, pg_arrays.py), and rollup statistics written as
  arrays (binary on PostgreSQL);
- **statements**: the driver's placeholder, inserting step rows (executemany, or binary COPY), upserts and
  inserts that skip an existing key, serialising creations, a commit that need not wait for the disk;
- **documents in SQL**: a stored JSON list's length and a stored document's size in bytes (the read bounds);
- **times**: SQLite hands back naive datetimes; every stored time is UTC (`aware_utc`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Engine, Float, LargeBinary, Table, Text, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import TypeEngine

from gradwatch.wire import (
    LAYER_FIELDS,
    MISSING_BITS,
    MISSING_BYTES,
    SCALAR_FIELDS,
    decode_value,
    encode_value,
    pack_floats,
    unpack_floats,
)

from .pg_arrays import float8_arrays, float8_matrix

__all__ = ["StorageDialect", "SQLite", "PostgreSQL", "storage_dialect", "dialect_named", "aware_utc",
           "sqlite_real_in", "sqlite_real_out", "encode_scalars", "decode_scalars", "float_section", "float_rows",
           "COPY_TYPES", "STEP_COLUMNS"]

F8 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

STEP_COLUMNS = ("run_pk", "step", "time", *SCALAR_FIELDS, "flags", *LAYER_FIELDS, "scalars")
"""The order of a step row's values, as steps_table.StepColumns.rows builds them."""
COPY_TYPES = ("int8", "int8", "float8", *("float8",) * len(SCALAR_FIELDS), "int2", *("float8[]",) * len(LAYER_FIELDS),
              "jsonb")
"""PostgreSQL's types of STEP_COLUMNS, for binary COPY."""


class LayerColumnLike(Protocol):
    """A per-layer column of a batch (steps_table.LayerColumn): its rows as blobs or as lists."""

    def blobs(self) -> Sequence[bytes | None]: ...

    def lists(self) -> list[list[float | None] | None]: ...


class StorageDialect(Protocol):
    """What storage code asks of a database kind."""

    name: str
    mark: str
    """the driver's placeholder in exec_driver_sql's SQL"""
    ready_takes_write_lock: bool
    """/readyz proves the database writable by taking the write lock (a SQLite file can be read-only or held)"""

    def real_type(self) -> TypeEngine[Any]:
        """The column type of a measured scalar."""

    def array_type(self) -> TypeEngine[Any]:
        """The column type of a per-layer array."""

    def real_param(self, x: float | None) -> Any:
        """A scalar as bound (None: not measured)."""

    def real_params(self, column: Sequence[float | None]) -> Sequence[Any]:
        """A scalar column as bound (None: not measured)."""

    def real_value(self, stored: Any) -> float | None:
        """A stored scalar as a float (None: not measured)."""

    def array_params(self, column: LayerColumnLike) -> Sequence[Any]:
        """A batch's per-layer column as bound, one value a step."""

    def array_param(self, values: list[float | None]) -> Any:
        """One per-layer array as bound (SQLAlchemy's bind of FloatArray)."""

    def array_value(self, stored: Any) -> list[float | None]:
        """One stored per-layer array as a list (None: not measured)."""

    def stat_arrays(self, m: F8, none: Mask, present: Sequence[bool]) -> list[Any]:
        """Rows of a (k, layers) matrix as bound arrays: `none` elements stored as not measured, a row not
        `present` as NULL."""

    def arrays_matrix(self, stored: Sequence[Any], n_cols: int) -> tuple[F8, Mask | None]:
        """Stored arrays (as `array_select` reads them; NULL or shorter than n_cols) as a (k, n_cols) matrix and
        its not-measured mask (None: all measured); NaN where not measured."""

    def array_select(self, column: str, nulls_as_nan: bool = False) -> str:
        """SQL that reads a whole stored array in the form `arrays_matrix` takes. `nulls_as_nan`: NULL elements
        read as NaN (the form stays fixed-size on PostgreSQL)."""

    def element_select(self, column: str, j: int) -> str:
        """SQL that reads the j-th (0-based) element of a stored array, in the form `elements_matrix` takes."""

    def elements_matrix(self, columns: Sequence[Sequence[Any]]) -> tuple[F8, Mask | None]:
        """Elements read one layer a column (`element_select`) as a (k, layers) matrix and its not-measured mask."""

    def scalars_param(self, doc: dict[str, Any]) -> Any:
        """A step's extra scalars (wire-encoded values) as bound: JSON text, or a JSONB document."""

    def insert_steps_sql(self) -> str:
        """The parameterised INSERT of STEP_COLUMNS in the driver's placeholder style."""

    def insert_steps(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert step rows (STEP_COLUMNS, as StepColumns.rows binds them) the fastest way the database has."""

    def upsert_sql(self, table: str, columns: Sequence[str], key: Sequence[str], binary: Callable[[str], bool]) -> str:
        """INSERT … ON CONFLICT (key) DO UPDATE every other column; `binary` columns are bound as pg_arrays'
        binary form where the database takes it."""

    def insert_skipping(self, table: Table, key: str) -> postgresql.Insert | sqlite.Insert:
        """INSERT … ON CONFLICT (key) DO NOTHING, to be given its values."""

    def serialize(self, conn: Connection, key: int) -> None:
        """Serialise this transaction with every other that calls this with `key` (SQLite's writers are
        serialised already)."""

    def lazy_commit(self, conn: Connection) -> None:
        """This transaction's commit need not wait for the disk: losing it in a crash loses nothing that matters
        (PostgreSQL; SQLite's synchronous setting is the engine's)."""

    def json_array_length(self, column: Any) -> Any:
        """SQL for the length of a stored JSON list (the names never reach Python)."""

    def json_size(self, column: Any) -> Any:
        """SQL for a stored document's size in bytes as the database gives it back (0 for NULL)."""


def sqlite_real_in(x: float | None) -> float | str | None:
    """A scalar as bound for SQLite: NaN becomes the text 'NaN' instead of NULL."""
    if x is not None and x != x:
        return "NaN"
    return x


def sqlite_real_out(x: Any) -> float | None:
    """A scalar as SQLite hands it back: the text 'NaN' is NaN."""
    if x is None or isinstance(x, float):
        return x
    if x == "NaN":
        return math.nan
    return float(x)


def float_section(section: bytes, n_cols: int) -> tuple[F8, Mask | None]:
    """A step-major float64 section (the binary wire's, SQLite's blobs joined) as a (k, n_cols) matrix and its
    not-measured mask (None: all measured)."""
    values = np.frombuffer(section, dtype="<f8").reshape(-1, n_cols)
    missing = values.view("<u8") == MISSING_BITS
    return values.astype(np.float64, copy=False), (missing if missing.any() else None)


def float_rows(rows: Sequence[Any], n_cols: int) -> bytes:
    """Per-layer values of steps (blobs, lists, None; shorter ones padded unmeasured) as one step-major section."""
    parts = []
    for r in rows:
        if r is None:
            parts.append(MISSING_BYTES * n_cols)
            continue
        b = r if isinstance(r, bytes) else pack_floats(r)
        parts.append(b[: 8 * n_cols] + MISSING_BYTES * (n_cols - len(b) // 8))
    return b"".join(parts)


def aware_utc(t: datetime) -> datetime:
    """A stored time as an aware UTC datetime: SQLite hands back naive ones, and every stored time is UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def decode_scalars(stored: Any) -> dict[str, float | None] | None:
    """A step's extra scalars as stored (JSON text or a document) back as floats."""
    if stored is None:
        return None
    if isinstance(stored, str):
        stored = json.loads(stored)
    return {k: decode_value(v) for k, v in stored.items()}


class SQLite:
    """SQLite: NaN as 'NaN' text in REAL columns, per-layer arrays as float64 blobs, executemany."""

    name = "sqlite"
    mark = "?"
    ready_takes_write_lock = True

    def real_type(self) -> TypeEngine[Any]:
        return Float(precision=53)

    def array_type(self) -> TypeEngine[Any]:
        return LargeBinary()

    def real_param(self, x: float | None) -> Any:
        return sqlite_real_in(x)

    def real_params(self, column: Sequence[float | None]) -> Sequence[Any]:
        return [v if v == v else "NaN" for v in column]  # None == None: a NaN alone is not equal to itself

    def real_value(self, stored: Any) -> float | None:
        return sqlite_real_out(stored)

    def array_params(self, column: LayerColumnLike) -> Sequence[Any]:
        return column.blobs()

    def array_param(self, values: list[float | None]) -> Any:
        return pack_floats(values)

    def array_value(self, stored: Any) -> list[float | None]:
        return unpack_floats(stored)

    def stat_arrays(self, m: F8, none: Mask, present: Sequence[bool]) -> list[Any]:
        m.view("<u8")[none] = MISSING_BITS
        flat, width = m.tobytes(), 8 * m.shape[1]  # one copy, sliced: cheaper than a tobytes() per row
        return [flat[i * width: (i + 1) * width] if ok else None for i, ok in enumerate(present)]

    def arrays_matrix(self, stored: Sequence[Any], n_cols: int) -> tuple[F8, Mask | None]:
        if n_cols == 0:
            return np.empty((len(stored), 0)), None
        if stored and all(type(v) is bytes and len(v) == 8 * n_cols for v in stored):  # noqa: E721 - the usual case
            return float_section(b"".join(stored), n_cols)
        return float_section(float_rows(stored, n_cols), n_cols)

    def array_select(self, column: str, nulls_as_nan: bool = False) -> str:
        return column

    def element_select(self, column: str, j: int) -> str:
        return f"substr({column}, {8 * j + 1}, 8)"

    def elements_matrix(self, columns: Sequence[Sequence[Any]]) -> tuple[F8, Mask | None]:
        """8-byte blobs; an empty one (past a shorter array's end) or NULL where not measured."""
        if not columns:
            return np.empty((0, 0)), None
        section = b"".join(v if v else MISSING_BYTES for row in zip(*columns, strict=True) for v in row)
        return float_section(section, len(columns))

    def scalars_param(self, doc: dict[str, Any]) -> Any:
        return json.dumps(doc)

    def insert_steps_sql(self) -> str:
        return f"INSERT INTO steps ({', '.join(STEP_COLUMNS)}) VALUES ({', '.join('?' * len(STEP_COLUMNS))})"

    def insert_steps(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.exec_driver_sql(self.insert_steps_sql(), rows)

    def upsert_sql(self, table: str, columns: Sequence[str], key: Sequence[str], binary: Callable[[str], bool]) -> str:
        return _upsert(table, columns, key, ["?"] * len(columns))

    def insert_skipping(self, table: Table, key: str) -> postgresql.Insert | sqlite.Insert:
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])

    def serialize(self, conn: Connection, key: int) -> None:
        pass  # one writer at a time already (db.write_transaction)

    def lazy_commit(self, conn: Connection) -> None:
        pass

    def json_array_length(self, column: Any) -> Any:
        return func.json_array_length(column)

    def json_size(self, column: Any) -> Any:
        return func.coalesce(func.length(column.cast(LargeBinary())), 0)


class PostgreSQL:
    """PostgreSQL: `double precision` and `double precision[]` hold NaN and ±Infinity natively; binary COPY and
    pg_arrays' binary arrays for speed."""

    name = "postgresql"
    mark = "%s"
    ready_takes_write_lock = False

    def real_type(self) -> TypeEngine[Any]:
        return postgresql.DOUBLE_PRECISION()

    def array_type(self) -> TypeEngine[Any]:
        return postgresql.ARRAY(postgresql.DOUBLE_PRECISION())

    def real_param(self, x: float | None) -> Any:
        return x

    def real_params(self, column: Sequence[float | None]) -> Sequence[Any]:
        return column

    def real_value(self, stored: Any) -> float | None:
        return stored  # type: ignore[no-any-return]

    def array_params(self, column: LayerColumnLike) -> Sequence[Any]:
        return column.lists()

    def array_param(self, values: list[float | None]) -> Any:
        return values

    def array_value(self, stored: Any) -> list[float | None]:
        return stored  # type: ignore[no-any-return]

    def stat_arrays(self, m: F8, none: Mask, present: Sequence[bool]) -> list[Any]:
        return float8_arrays(m, none, np.asarray(present, dtype=bool))

    def arrays_matrix(self, stored: Sequence[Any], n_cols: int) -> tuple[F8, Mask | None]:
        values, null = float8_matrix(stored, n_cols)
        return values, (null if null.any() else None)

    def array_select(self, column: str, nulls_as_nan: bool = False) -> str:
        return f"array_send(array_replace({column}, NULL, 'NaN'::float8))" if nulls_as_nan else \
            f"array_send({column})"

    def element_select(self, column: str, j: int) -> str:
        return f"{column}[{j + 1}]"

    def elements_matrix(self, columns: Sequence[Sequence[Any]]) -> tuple[F8, Mask | None]:
        """Floats; None where not measured."""
        values = np.empty((len(columns[0]) if columns else 0, len(columns)))
        missing = None
        for j, column in enumerate(columns):
            values[:, j] = np.array(column, dtype=np.float64)  # None becomes NaN; the mask tells them apart
            if None in column:
                if missing is None:
                    missing = np.zeros(values.shape, dtype=bool)
                missing[:, j] = [v is None for v in column]
        return values, missing

    def scalars_param(self, doc: dict[str, Any]) -> Any:
        return doc

    def insert_steps_sql(self) -> str:
        marks = [f"%s::{t}" if t.endswith("[]") or t == "jsonb" else "%s" for t in COPY_TYPES]
        return f"INSERT INTO steps ({', '.join(STEP_COLUMNS)}) VALUES ({', '.join(marks)})"

    def insert_steps(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Binary COPY: five times executemany's rate. COPY cannot skip conflicting rows, which is fine: ingest
        has removed stored steps under the run's row lock, so no other transaction can insert these meanwhile."""
        from psycopg.types.json import Jsonb  # the postgres extra: only here when PostgreSQL is in use

        scalars_at = STEP_COLUMNS.index("scalars")
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY steps ({', '.join(STEP_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(list(COPY_TYPES))
            for row in rows:
                if row[scalars_at] is not None:
                    row = (*row[:scalars_at], Jsonb(row[scalars_at]))
                copy.write_row(row)

    def upsert_sql(self, table: str, columns: Sequence[str], key: Sequence[str], binary: Callable[[str], bool]) -> str:
        return _upsert(table, columns, key, ["%b" if binary(c) else "%s" for c in columns])

    def insert_skipping(self, table: Table, key: str) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])

    def serialize(self, conn: Connection, key: int) -> None:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(key)})")

    def lazy_commit(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def json_array_length(self, column: Any) -> Any:
        return func.jsonb_array_length(column)

    def json_size(self, column: Any) -> Any:  # jsonb's text form
        return func.coalesce(func.octet_length(column.cast(Text())), 0)


def _upsert(table: str, columns: Sequence[str], key: Sequence[str], marks: Sequence[str]) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


_BY_NAME: dict[str, StorageDialect] = {"sqlite": SQLite(), "postgresql": PostgreSQL()}


def dialect_named(name: str) -> StorageDialect:
    """The dialect of a SQLAlchemy dialect name (a database kind gradwatch does not know: KeyError)."""
    return _BY_NAME[name]


def storage_dialect(bind: Connection | Engine) -> StorageDialect:
    """The dialect of a connection's or engine's database."""
    return _BY_NAME[bind.dialect.name]


def encode_scalars(scalars: dict[str, float | None], dialect: StorageDialect) -> Any:
    """A step's extra scalars as stored: wire-encoded values (NaN as "NaN"), in the dialect's JSON form."""
    return dialect.scalars_param({k: encode_value(v) for k, v in scalars.items()})
