"""`python bench/_without_rollups.py serve ...` is `gradwatch serve ...` whose rollup worker merges nothing.

bench/query.py starts one beside a normal gradwatch to measure, side by side, what keeping the step rollups costs
ingest. Ingest leaves the rollups to the worker, which is told of no batch here: the database's rollups stay
empty, and series read raw steps. For a benchmark only; the switch lives here, not in the service.
"""

from gradwatch.cli import main
from gradwatch_service.storage.rollup_worker import RollupWorker

RollupWorker.note = lambda self, run_pk, batch=None: None  # type: ignore[method-assign]
raise SystemExit(main())
