"""The rollup worker: a daemon thread in every service process that merges acknowledged steps into the step
rollups after their batch's commit, so ingest's transaction stores steps and nothing more.

Why not in the ingest transaction: a 1,000-step batch's rollups are ~26 rows of a few KiB rewritten (every
level's last bucket, and the new 64-step buckets) and a few milliseconds of numpy, which cost ingest a third
of its rate (docs/benchmarks.md, "Ingest and the rollups"). Here they are merged under the run's lock in write
transactions of their own, from the batches ingest hands over (kept in memory: nothing read back), several
batches of a run at once while ingest is busy, so every level's last bucket is written once for all of them.
When what is in memory is not exactly what waits (another process stored steps of the run, or this one
restarted), the steps are read back from the steps table a chunk at a time (rollups.catch_up_rollups).

Nothing reads a rollup that misses an acknowledged step: `rolled_up_through` says up to which step a run's
rollups are complete, and a series reads the steps above it from the steps table (queries.plan_downsample). Late
steps at or below it are merged by ingest itself. The Grafana dashboards, which read step_rollups in SQL, lag
by as long as the worker does (milliseconds when idle). At start the worker takes the runs whose steps go
beyond their rollups (a process stopped before merging them); at stop it merges what it was told of.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine, select

from .db import read_connection, write_transaction
from .models import runs
from .rollups import batch_values, catch_up_rollups, lagging_runs, merge_waiting
from .steps_table import StepColumns

__all__ = ["RollupWorker"]

log = logging.getLogger("gradwatch.rollups")

_RETRY_S = 1.0
"""How long a run whose merge failed (the database busy or away) waits before the next try."""


_HOLD_AT_MOST = 8
"""While merges lag behind ingest, the batches held stay under this many times `max_values`: beyond it a run's
steps are read back from the steps table instead (they are stored already)."""


class RollupWorker:
    """Merges the steps of the runs it is told of (`note`, after each commit) into their rollups."""

    def __init__(self, engine: Engine, chunk: int = 16_384, gather_s: float = 1.0, max_values: int = 500_000) -> None:
        self.engine = engine
        self.chunk = chunk
        self.gather_s = gather_s
        """how long a wake-up waits for more batches before merging: several batches of a busy run are merged in
        one transaction, their upper levels' buckets written once (a merge has a fixed cost of a few
        milliseconds: 1,000 steps of 50 values alone cost twice as much a step as 16 such batches at once)"""
        self.max_values = max_values
        """the service passes GRADWATCH_MAX_BATCH_VALUES (values: steps × layers). The gathering ends early once
        the batches held hold four times this many, and a run's batches are merged in groups of at most this many
        (rollups.merge_waiting): what is held and what a merge builds stay bounded however wide the runs"""
        self._held = 0
        """values of the batches held in `_waiting`"""
        self._waiting: dict[int, list[tuple[StepColumns, int]] | None] = {}
        """run → the batches ingest handed over since the last merge (None: read the steps back)"""
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> RollupWorker:
        with read_connection(self.engine) as conn:
            self._waiting.update(dict.fromkeys(lagging_runs(conn)))
        self._thread = threading.Thread(target=self._run, name="gradwatch-rollups", daemon=True)
        self._thread.start()
        return self

    def note(self, run_pk: int, batch: tuple[StepColumns, int] | None = None) -> None:
        """A transaction that stored steps of this run above its rollups has committed; `batch`: those steps,
        when they are all the batch left waiting, with the run's layer count."""
        with self._wake:
            first = not self._waiting
            if run_pk not in self._waiting:
                self._waiting[run_pk] = [] if batch is not None else None
            held = self._waiting[run_pk]
            if held is not None:
                values = 0 if batch is None else batch_values(batch)
                if batch is None or self._held + values > _HOLD_AT_MOST * self.max_values:
                    self._held -= sum(map(batch_values, held))
                    self._waiting[run_pk] = None
                else:
                    held.append(batch)
                    self._held += values
            if first or self._enough_held():
                self._wake.notify()

    def _enough_held(self) -> bool:
        """The batches held are worth merging now, without gathering more (see `max_values`)."""
        return self._held >= 4 * self.max_values

    def stop(self, timeout_s: float = 30.0) -> None:
        """Merge what is waiting (for at most `timeout_s`; the next start takes the rest), then end."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if not self._waiting:
                    return
                if not self._stopping:  # only `stop()` or enough values held end this early
                    self._wake.wait_for(lambda: self._stopping or self._enough_held(), self.gather_s)
                waiting, self._waiting, self._held = self._waiting, {}, 0
            failed = []
            for run_pk, batches in sorted(waiting.items()):
                try:
                    self.catch_up(run_pk, batches)
                except Exception:  # noqa: BLE001 - the database busy or away: the run is tried again
                    log.exception("merging the rollups of run %s failed; trying again in %g s", run_pk, _RETRY_S)
                    failed.append(run_pk)
            with self._wake:
                if failed and not self._stopping:
                    self._waiting.update(dict.fromkeys(failed))
                    self._wake.wait(_RETRY_S)

    def catch_up(self, run_pk: int, batches: list[tuple[StepColumns, int]] | None = None) -> None:
        """All of the run's steps above its rollups: the batches handed over, in one transaction, when they are
        exactly those; otherwise read back a chunk a transaction (ingest waits at most one chunk)."""
        while True:
            with write_transaction(self.engine) as conn:
                run = conn.execute(select(runs.c.layer_names).where(runs.c.id == run_pk)
                                   .with_for_update()).first()
                if run is None:  # deleted meanwhile (gradwatch db prune)
                    return
                if batches and merge_waiting(conn, run_pk, batches, len(run.layer_names), self.max_values):
                    return  # any steps above these were handed over meanwhile, and are waiting their turn
                batches = None
                merged = catch_up_rollups(conn, run_pk, len(run.layer_names), chunk=self.chunk, max_steps=1)
            if not merged:
                return

