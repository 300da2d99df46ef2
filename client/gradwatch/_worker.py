"""The sender: a daemon thread that batches sealed steps, ships them, and spools what it cannot ship.

The shape is sentry-python's worker: the training thread only enqueues (never blocks, never raises); the thread
starts lazily; `flush(timeout)` waits a bounded time and then leaves the rest in the spool. What it adds is
durability: a batch that cannot be delivered goes to the disk spool instead of being dropped, and every step
that is lost anyway is counted by reason.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._batch import StepBatch, spooled_steps
from ._options import Options
from ._spool import Spool, SpoolFull, hostname
from ._step import StepRecord
from ._transport import Response, Transport, TransportError

__all__ = ["DeliveryStats", "Worker"]

logger = logging.getLogger("gradwatch")

RETRY_AFTER_CAP = 300.0
DRAIN_BATCHES_PER_TICK = 20
TICK = 0.1  # the sender collects sealed steps this often: no wake-up per step, so log() stays cheap


@dataclass
class DeliveryStats:
    """What happened to the steps of a run. Every step ends up delivered, spooled, or lost (by reason)."""

    sealed: int = 0
    delivered: int = 0
    duplicates: int = 0
    spooled: int = 0
    lost: Counter[str] = field(default_factory=Counter)
    refused: str | None = None
    """why the service last refused this client's token (401/403 and its detail); None once a batch gets in"""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_lost(self, reason: str, n: int) -> None:
        if n:
            with self.lock:
                self.lost[reason] += n


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _RunUpdate:
    body: dict[str, Any]


class Worker:
    """Owns the queue, the sender thread and the run's spool; talks to the service through `transport`."""

    def __init__(
        self,
        run_id: str,
        run_body: dict[str, Any],
        options: Options,
        spool: Spool,
        stats: DeliveryStats,
        transport: Transport,
        on_incidents: Callable[[list[dict[str, Any]]], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ):
        self.run_id = run_id
        self.options = options
        self.spool = spool
        self.stats = stats
        self._run_body = dict(run_body)
        self._on_incidents = on_incidents
        self._on_tick = on_tick
        # Sealed steps: a plain deque (append and popleft are atomic), bounded by max_queue in submit(), with
        # no per-step notification: the sender wakes every TICK, or at once for a full batch or a control item.
        self._records: collections.deque[StepRecord] = collections.deque()
        self._controls: collections.deque[object] = collections.deque()
        self._wake = threading.Event()
        self._last_tick = 0.0
        self._transport = transport
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._start_lock = threading.Lock()
        # Guarded by _state_lock (never held across network I/O, so a takeover never waits on the network):
        self._state_lock = threading.Lock()
        self._pending: list[StepRecord] = []
        self._pending_since = 0.0
        self._overflow: list[StepRecord] = []
        self._inflight: StepBatch | None = None
        self._layers: list[str] = []
        self._layer_set: set[str] = set()
        # Owned by the sender thread:
        self._run_created = False
        self._run_dirty = False
        self._failures = 0
        self._retry_at = 0.0
        self._auth_failed = False
        self._spool_pending = spool.has_pending()
        self._abandoned = False
        self._run_path = f"/v1/runs/{run_id}"

    # -- called from the training thread ---------------------------------------------------------------
    def submit(self, record: StepRecord) -> None:
        """Hand a sealed step to the sender; when the queue is full it goes to the spool instead."""
        if self._thread is None or self._pid != os.getpid():
            self._start()
        with self.stats.lock:
            self.stats.sealed += 1
        records = self._records
        if len(records) < self.options.max_queue:
            records.append(record)
            if len(records) == self.options.batch_size:
                self._wake.set()
            return
        spill: list[StepRecord] | None = None
        with self._state_lock:
            self._overflow.append(record)
            if len(self._overflow) >= self.options.batch_size:
                spill, self._overflow = self._overflow, []
        if spill:
            self._spool_records(spill)

    def update_run(self, body: dict[str, Any]) -> None:
        """Send a run update (e.g. the final status) after every step submitted before it."""
        self._start()
        self._put_control(_RunUpdate(body))

    def flush(self, timeout: float) -> bool:
        """Deliver everything submitted so far, trying the spool once more; True when done within `timeout`.
        What is not delivered in time stays in (or is moved to) the spool."""
        if self._thread is None:
            return not self._spool_pending
        if threading.current_thread() is self._thread:
            return False  # called from on_alert: the sender cannot wait for itself
        marker = _Flush()
        self._put_control(marker)
        if not marker.done.wait(max(0.0, timeout)):
            return False
        return not self._spool_pending

    def stop(self) -> None:
        """End the sender thread at its next wake-up (after a complete flush, there is nothing left to do)."""
        self._abandoned = True

    def abandon(self) -> None:
        """Stop the sender where it is and move everything not yet delivered to the spool.

        Used when `flush` ran out of time (a hung service): the thread may still be blocked in a request, so
        that request's batch is spooled too; if it did arrive, the resend is a harmless duplicate."""
        self._abandoned = True
        batches: list[StepBatch] = []
        with self._state_lock:
            if self._inflight is not None:
                batches.append(self._inflight)
                self._inflight = None
            records, self._pending = self._pending, []
            records += self._overflow
            self._overflow = []
            while self._records:
                records.append(self._records.popleft())
            while self._controls:
                item = self._controls.popleft()
                if isinstance(item, _RunUpdate):
                    self._run_body = {**self._run_body, **item.body}
                    self._run_dirty = True
                elif isinstance(item, _Flush):
                    item.done.set()
            for start in range(0, len(records), self.options.batch_size):
                batches.append(self._encode(records[start:start + self.options.batch_size]))
        for batch in batches:
            self._spool_body(batch)
        self._write_meta(force=bool(batches) or self._run_dirty or not self._run_created)

    def deliver_spool(self) -> bool:
        """Send this run's spool and its latest run body now, in the caller's thread (for `gradwatch sync`,
        with no sender thread running). True when the spool is empty and the run body was accepted."""
        self._retry_at = 0.0
        self._run_dirty = True
        try:
            if self.spool.has_pending():
                self._spool_pending = True
                self._drain(max_batches=None)
            elif not self._put_run():
                return False
            return not self._spool_pending and not self._run_dirty
        finally:
            self._transport.close()

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    # -- the thread --------------------------------------------------------------------------------------
    def _start(self) -> None:
        with self._start_lock:
            if self._pid != os.getpid():
                # A forked child: the parent's thread does not exist here.
                self._pid = os.getpid()
                self._thread = None
                self._records = collections.deque()
                self._controls = collections.deque()
                self._wake = threading.Event()
                self._state_lock = threading.Lock()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=f"gradwatch-sender-{self.run_id}",
                                                daemon=True)
                self._thread.start()

    def _put_control(self, item: object) -> None:
        self._controls.append(item)
        self._wake.set()

    def _loop(self) -> None:
        try:
            while not self._abandoned:
                self._wake.wait(self._wait_time())
                self._wake.clear()
                if self._abandoned:
                    return
                try:
                    self._cycle()
                except Exception:  # the sender must outlive any bug in one batch
                    logger.exception("gradwatch: sender error (continuing)")
        finally:
            self._transport.close()  # the keep-alive socket goes with the thread, not with the garbage collector

    def _cycle(self) -> None:
        now = time.monotonic()
        if self._on_tick is not None and now - self._last_tick >= TICK:
            self._last_tick = now
            self._on_tick()
        while True:
            self._take_records()
            if not self._controls:
                break
            item = self._controls.popleft()
            if isinstance(item, _RunUpdate):
                self._ship_all()
                self._run_body = {**self._run_body, **item.body}
                self._run_dirty = True
                # The update goes out after the spooled steps (see _drain); kept in run.json until it does.
                if self._spool_pending or not self._put_run():
                    self._write_meta(force=True)
            elif isinstance(item, _Flush):
                self._ship_all()
                self._retry_at = 0.0
                if self._spool_pending:
                    self._drain(max_batches=None)
                elif self._run_dirty and not self._put_run():
                    self._write_meta(force=True)
                item.done.set()
        if (self._pending and time.monotonic() - self._pending_since >= self.options.batch_age) or self._overflow:
            self._ship()
        if self._spool_pending and time.monotonic() >= self._retry_at and not self._auth_failed:
            self._drain(max_batches=DRAIN_BATCHES_PER_TICK)

    def _take_records(self) -> None:
        """Move sealed steps from the deque into the pending batch, shipping each batch as it fills."""
        records = self._records
        while True:
            # Under the lock, so that abandon() finds every step either in the deque or in the batch.
            with self._state_lock:
                if self._abandoned or not records:
                    return
                record = records.popleft()
                record.materialize()
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending.append(record)
                full = len(self._pending) >= self.options.batch_size
            if full:
                self._ship()

    def _wait_time(self) -> float:
        now = time.monotonic()
        wait = TICK
        if self._pending:
            wait = min(wait, self._pending_since + self.options.batch_age - now)
        if self._spool_pending and not self._auth_failed:
            wait = min(wait, self._retry_at - now)
        return max(0.001, wait)

    # -- shipping ----------------------------------------------------------------------------------------
    def _ship(self) -> None:
        with self._state_lock:
            records, self._pending = self._pending, []
            if self._overflow and len(records) < self.options.batch_size:
                records += self._overflow
                self._overflow = []
            if not records:
                return
            batch = self._encode(records)
            direct = not (self._spool_pending or self._auth_failed or time.monotonic() < self._retry_at)
            if direct:
                self._inflight = batch
        if not direct:
            self._spool_body(batch)
            return
        delivered = self._post(batch)
        with self._state_lock:
            still_mine = self._inflight is batch
            self._inflight = None
        if not delivered and still_mine and not self._abandoned:
            self._spool_body(batch)

    def _ship_all(self) -> None:
        while self._pending or self._overflow:
            self._ship()

    def _drain(self, max_batches: int | None) -> None:
        self._spool_pending = not self.spool.drain(self._post_spooled, max_batches)
        if self.spool.corrupt_lines:
            self.stats.count_lost("corrupt_spool", self.spool.corrupt_lines)
            self.spool.corrupt_lines = 0
        if not self._spool_pending:
            if self._run_dirty and not self._put_run():
                self._write_meta(force=True)
                return
            if self._run_body.get("status", "running") != "running":
                self.spool.remove_if_empty()

    def _post_spooled(self, body: dict[str, Any]) -> bool:
        if self._abandoned:
            return False
        try:
            batch = StepBatch.from_spooled(body)
        except ValueError:
            self.stats.count_lost("corrupt_spool", spooled_steps(body))
            return True
        delivered = self._post(batch)
        if delivered:
            with self.stats.lock:
                self.stats.spooled -= len(batch)
        return delivered

    def _encode(self, records: list[StepRecord]) -> StepBatch:
        """Caller holds _state_lock. The run's layer list only ever grows, as the service requires."""
        for record in records:
            record.materialize()
            for name in record.layer_names():
                if name not in self._layer_set:
                    self._layer_set.add(name)
                    self._layers.append(name)
        return StepBatch.of(records, self._layers)

    def _spool_records(self, records: list[StepRecord]) -> None:
        with self._state_lock:
            batch = self._encode(records)
        self._spool_body(batch)

    def _spool_body(self, batch: StepBatch) -> None:
        n = len(batch)
        try:
            first = not self.spool.directory.exists()
            self.spool.append(batch.spooled())
            if first:
                self._write_meta(force=True)
        except SpoolFull:
            self.stats.count_lost("spool_full", n)
            return
        except OSError as exc:
            logger.error("gradwatch: cannot write the spool at %s: %s", self.spool.directory, exc)
            self.stats.count_lost("disk_error", n)
            return
        self._spool_pending = True
        with self.stats.lock:
            self.stats.spooled += n

    def _write_meta(self, force: bool = False) -> None:
        meta = {
            "run_id": self.run_id,
            "url": self.options.url,
            "run": self._run_body,
            "owner": {"pid": os.getpid(), "host": hostname()},
            "finished": self._run_body.get("status", "running") != "running",
        }
        try:
            self.spool.write_meta(meta, create=force)
        except OSError as exc:
            logger.error("gradwatch: cannot write the spool at %s: %s", self.spool.directory, exc)

    # -- HTTP --------------------------------------------------------------------------------------------
    def _put_run(self) -> bool:
        try:
            response = self._transport.request("PUT", self._run_path, self._run_body)
        except TransportError as exc:
            self._failed(None, exc)
            return False
        if response.status in (200, 201):
            self._run_created = True
            self._run_dirty = False
            return True
        self._rejected(response, "PUT run", 0)
        return False

    def _post(self, batch: StepBatch, _attempt: int = 0) -> bool:
        """True when the batch is settled (stored, or lost and counted); False to retry it later."""
        if not self._run_created and not self._put_run():
            return False
        try:
            response = self._transport.post_steps(self._run_path + "/steps", batch)
        except TransportError as exc:
            self._failed(None, exc)
            return False
        n = len(batch)
        if response.status == 200:
            self._failures = 0
            self._auth_failed = False
            self.stats.refused = None
            result = response.body if isinstance(response.body, dict) else {}
            with self.stats.lock:
                self.stats.delivered += n
                self.stats.duplicates += int(result.get("duplicates") or 0)
            # raised: opened by this batch, even if its later steps resolved them; open: the run's, now
            incidents = [*(result.get("raised_incidents") or ()), *(result.get("open_incidents") or ())]
            if incidents and self._on_incidents is not None:
                self._on_incidents(incidents)
            return True
        if response.status == 404 and _attempt == 0:
            self._run_created = False
            return self._post(batch, 1)
        if response.status == 409:
            return self._conflict(batch, response)
        if response.status == 413 and n > 1:
            return all([self._post(half) for half in batch.split()])
        outcome = self._rejected(response, "POST steps", n)
        return outcome if outcome is not None else False

    def _conflict(self, batch: StepBatch, response: Response) -> bool:
        """Nothing of a 409 batch was stored: count the conflicting steps, resend the rest."""
        detail = response.body.get("detail") if isinstance(response.body, dict) else None
        conflicting = detail.get("steps") if isinstance(detail, dict) else None
        if not isinstance(conflicting, list) or not conflicting:
            self.stats.count_lost("conflict", len(batch))
            logger.error("gradwatch: the service refused %d steps as conflicting: %s", len(batch), detail)
            return True
        bad = set(conflicting)
        keep = batch.without(bad)
        self.stats.count_lost("conflict", len(batch) - len(keep))
        logger.error("gradwatch: steps %s were already stored with different values; not resent",
                     sorted(bad)[:10])
        if not len(keep):
            return True
        return self._post(keep)

    def _rejected(self, response: Response, what: str, n: int) -> bool | None:
        """A non-success status: None/False means retry later, True means settled (lost and counted)."""
        status = response.status
        if status in (429, 503) or status >= 500 or status == 404:
            self._failed(response, None)
            return None
        if status in (401, 403):
            # Retrying cannot help until someone fixes the token: keep the steps in the spool, stop trying until
            # the next flush (finish() makes one more attempt), and say so once; the report says it again.
            detail = response.body.get("detail") if isinstance(response.body, dict) else None
            self.stats.refused = f"{status} {detail}" if isinstance(detail, str) else str(status)
            if not self._auth_failed:
                logger.error("gradwatch: %s refused (%s): check GRADWATCH_TOKEN; steps are kept in %s",
                             what, self.stats.refused, self.spool.directory)
            self._auth_failed = True
            return None
        detail = response.body.get("detail") if isinstance(response.body, dict) else response.body
        logger.error("gradwatch: %s rejected with %d: %s", what, status, detail)
        self.stats.count_lost("too_large" if status == 413 else "rejected", n)
        return True

    def _failed(self, response: Response | None, exc: Exception | None) -> None:
        self._failures += 1
        delay = min(self.options.max_backoff, self.options.min_backoff * 2 ** (self._failures - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        retry_after = response.retry_after if response is not None else None
        if retry_after is not None:
            delay = min(max(delay, retry_after), RETRY_AFTER_CAP)
        self._retry_at = time.monotonic() + delay
        if self._failures == 1:
            what = f"HTTP {response.status}" if response is not None else str(exc)
            logger.warning("gradwatch: service at %s unavailable (%s); spooling to %s and retrying",
                           self.options.url, what, self.spool.directory)


