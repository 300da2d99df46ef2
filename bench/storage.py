"""Bytes on disk per stored value: 100,000 steps x 50 values (loss, grad norm, lr, update norm, 46 layer norms).

Steps go in through the service's own ingest code (validation, encoding, one transaction per 1000-step batch),
then SQLite's file (after a WAL checkpoint and VACUUM) or PostgreSQL's table with its indexes and TOAST is
measured. Run: `python bench/storage.py [--quick] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, fresh_database, print_table  # noqa: E402
from ingest import LAYERS, VALUES_PER_STEP, batches, make_steps  # noqa: E402


def measure(backend: str, n_steps: int, workdir: Path) -> dict[str, float]:
    from sqlalchemy import text

    from gradwatch_service.ingest import append_steps, upsert_run
    from gradwatch_service.schemas import RunUpsert, StepBatch
    from gradwatch_service.storage.db import make_engine, write_transaction
    from gradwatch_service.storage.migrate import upgrade

    with fresh_database(backend, workdir) as url:
        engine = make_engine(url)
        upgrade(engine)
        with write_transaction(engine) as conn:
            upsert_run(conn, "storage", RunUpsert(layers=LAYERS))
        for chunk in batches(make_steps(n_steps, 7), 1000):
            batch = StepBatch.model_validate_json(json.dumps({"steps": chunk}))
            with write_transaction(engine) as conn:
                append_steps(conn, "storage", batch)
        if backend == "sqlite":
            engine.dispose()
            db = sqlite3.connect(engine.url.database or "", isolation_level=None)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("VACUUM")
            try:
                size = db.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'steps'").fetchone()[0]
            except sqlite3.OperationalError:  # SQLite built without dbstat: the whole file is an upper bound
                size = None
            db.close()
            file_size = Path(engine.url.database or "").stat().st_size
            size = size or file_size
        else:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE steps"))
                size = conn.execute(text("SELECT pg_total_relation_size('steps')")).scalar()
                file_size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
        engine.dispose()
    values = n_steps * VALUES_PER_STEP
    return {"bytes_per_value": size / values, "steps_table_bytes": float(size), "database_bytes": float(file_size)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 steps instead of 100,000")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--steps", type=int, help="steps to store (default 100,000; quick 10,000)")
    args = ap.parse_args()
    n_steps = args.steps or (10_000 if args.quick else 100_000)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gradwatch-storage-") as tmp:
        for backend in args.backends.split(","):
            m = measure(backend, n_steps, Path(tmp))
            figures[f"{backend}_bytes_per_value"] = round(m["bytes_per_value"], 2)
            if not args.json:
                print_table(f"storage, {backend}: {n_steps:,} steps x {VALUES_PER_STEP} values", [
                    ("bytes per value (steps table + indexes)", round(m["bytes_per_value"], 2)),
                    ("steps table bytes", int(m["steps_table_bytes"])),
                    ("whole database bytes", int(m["database_bytes"])),
                ])
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
