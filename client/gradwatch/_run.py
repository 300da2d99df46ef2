"""A run: the object a training script holds, and `init()` that makes one.

`log()` is on the training loop's hot path, so it does the least it can: convert the values, merge them into
the step's record under a lock, and hand sealed records to the sender thread. Nothing in it waits on the
network or the disk, and nothing in it raises unless the user asked for strict mode.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

from ._errors import CriticalIncident, GradwatchError
from ._options import InitOptions, Options
from ._spool import Spool, hostname
from ._step import StepRecord, host_value
from ._transport import HttpTransport
from ._worker import DeliveryStats, Worker
from .wire import RUN_ID_PATTERN, RUN_STATUSES, USER_AGENT, jsonable

__all__ = ["DeliveryReport", "Run", "init"]

logger = logging.getLogger("gradwatch")

_RUN_ID = re.compile(RUN_ID_PATTERN)

_live_runs: weakref.WeakSet[Run] = weakref.WeakSet()
_atexit_registered = False
_atexit_lock = threading.Lock()


@dataclass
class DeliveryReport:
    """What happened to a run's steps, as `finish()` found it."""

    run_id: str
    steps: int = 0
    delivered: int = 0
    spooled: int = 0
    lost: dict[str, int] = field(default_factory=dict)
    spool_dir: str | None = None
    refused: str | None = None
    """the service refused the token (its status and reason): the steps wait in the spool for a good one"""

    def __str__(self) -> str:
        text = f"run {self.run_id}: {self.steps} steps, {self.delivered} delivered"
        if self.spooled:
            text += f", {self.spooled} left in {self.spool_dir} (send them with `gradwatch sync`)"
        if self.refused:
            text += (f"; the service refused the token ({self.refused}): check GRADWATCH_TOKEN (an ingest token of "
                     "this run's project), then `gradwatch sync --token ...`")
        if self.lost:
            text += ", LOST " + ", ".join(f"{n} ({reason})" for reason, n in sorted(self.lost.items()))
        return text


def init(
    project: str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    run_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
    **options: Unpack[InitOptions],
) -> Run:
    """Start a run and return it. Options are the fields of `gradwatch.Options` (url, token, spool_dir,
    on_alert, on_critical, local_detection, strict, all_ranks, transport, ...), typed by `gradwatch.InitOptions`:
    a misspelled one is a TypeError here and an error in mypy.

    Under torch.distributed only rank 0 gets a live run (other ranks get one whose methods do nothing),
    unless `all_ranks=True`, where each rank is its own run with the rank in its id and name."""
    settings: dict[str, Any] = dict(options)
    spool_dir = settings.pop("spool_dir", None)
    opts = Options(**settings)  # an unknown option is a TypeError here, as at any call
    if spool_dir is not None:
        opts.spool_dir = Path(spool_dir)
    if opts.on_critical not in ("warn", "raise", "stop"):
        raise ValueError(f"on_critical must be 'warn', 'raise' or 'stop', not {opts.on_critical!r}")
    if opts.wire not in ("binary", "json"):
        raise ValueError(f"wire must be 'binary' or 'json', not {opts.wire!r}")
    opts.spool_dir = opts.spool_dir.expanduser()
    rank = _distributed_rank()
    if rank and not opts.all_ranks:
        return Run(run_id or "disabled", opts, {}, enabled=False)
    run_id = run_id or os.environ.get("GRADWATCH_RUN_ID") or _new_run_id()
    if rank is not None and opts.all_ranks:
        run_id = f"{run_id}-rank{rank}"
        name = f"{name or run_id} [rank {rank}]"
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit, "
                         f"got {run_id!r}")
    body: dict[str, Any] = {
        "project": project or os.environ.get("GRADWATCH_PROJECT") or "default",
        "status": "running",
        "meta": {"host": hostname(), "pid": os.getpid(), "python": sys.version.split()[0],
                 "client": USER_AGENT, **jsonable(dict(meta or {}))},
    }
    if name:
        body["name"] = name
    if config:
        body["config"] = jsonable(dict(config))
    if rank is not None:
        body["meta"]["rank"] = rank
    run = Run(run_id, opts, body)
    _register_atexit()
    _live_runs.add(run)
    return run


class Run:
    """One training run. Thread-safe; in a forked child (a DataLoader worker) every method does nothing."""

    def __init__(self, run_id: str, options: Options, body: dict[str, Any], enabled: bool = True):
        self.run_id = run_id
        self.options = options
        self.project: str = body.get("project", "default")
        self.name: str | None = body.get("name")
        self.should_stop = False
        """Set by `log()` when a critical incident opened and `on_critical="stop"`: leave the loop now."""
        self._enabled = enabled
        self._finished = False
        self._report: DeliveryReport | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._open: dict[int, StepRecord] = {}
        self._held: set[int] = set()
        self._sealed_max = -1
        self._flush_hooks: list[Callable[[], None]] = []
        self._seen_incidents: set[Any] = set()
        self._seen_lock = threading.Lock()  # incidents arrive from the training thread and the sender
        self._criticals: collections.deque[dict[str, Any]] = collections.deque()
        self._warned_critical = False
        self._client_errors = 0
        self.stats = DeliveryStats()
        self._detector: _LocalDetector | None = None
        if not enabled:
            return
        local = options.local_detection
        if local if local is not None else options.on_critical in ("stop", "raise"):
            self._detector = _LocalDetector()
        spool = Spool(options.spool_dir / run_id, options.spool_max_bytes)
        transport = options.transport
        if transport is None:
            transport = HttpTransport(options.url, options.token, options.timeout, options.compress,
                                      binary=options.wire == "binary")
        self._worker = Worker(run_id, body, options, spool, self.stats, transport,
                              on_incidents=self._incidents_seen, on_tick=self._seal_stale)

    # -- logging -----------------------------------------------------------------------------------------
    def log(
        self,
        step: int,
        loss: Any = None,
        grad_norm: Any = None,
        lr: Any = None,
        update_norm: Any = None,
        skipped: bool | None = None,
        **scalars: Any,
    ) -> None:
        """Record values for an optimizer step. Floats, numpy scalars and 0-d tensors; NaN and ±Inf are kept.

        Calls for the same step merge; a step is sent once a later step is logged (or on flush/finish). With
        local detection the step is judged in this call when its values are all in (docs/client.md,
        "Alerts and closing the loop"), so `on_critical` acts before it returns."""
        if not self._enabled or self._finished or self._pid != os.getpid():
            return
        try:
            values: dict[str, Any] = {}
            if loss is not None:
                values["loss"] = host_value(loss)
            if grad_norm is not None:
                values["grad_norm"] = host_value(grad_norm)
            if lr is not None:
                values["lr"] = host_value(lr)
            if update_norm is not None:
                values["update_norm"] = host_value(update_norm)
            if skipped is not None:
                values["skipped"] = bool(skipped)
            if scalars:
                values["scalars"] = {str(k): host_value(v) for k, v in scalars.items()}
            self._merge(step, values, True)
        except Exception as exc:
            self._client_error(exc)
        if self._criticals:  # after recording: the step that raises is not lost
            self._act_on_critical()

    def log_layers(
        self,
        step: int,
        grad_norms: Mapping[str, Any] | None = None,
        weight_norms: Mapping[str, Any] | None = None,
        update_norms: Mapping[str, Any] | None = None,
    ) -> None:
        """Record per-layer norms (layer name → value) for an optimizer step; merges with `log` of that step."""
        if not self._enabled or self._finished or self._pid != os.getpid():
            return
        try:
            values: dict[str, Any] = {}
            if grad_norms:
                values["grad_norms"] = {str(k): host_value(v) for k, v in grad_norms.items()}
            if weight_norms:
                values["weight_norms"] = {str(k): host_value(v) for k, v in weight_norms.items()}
            if update_norms:
                values["update_norms"] = {str(k): host_value(v) for k, v in update_norms.items()}
            self._merge(step, values, True)
        except Exception as exc:
            self._client_error(exc)

    # -- the instrumentation seam (`gradwatch._sink.StepSink`) --------------------------------------------
    def log_measured(self, step: int, values: Mapping[str, Any]) -> None:
        """For instrumentation: fills only what the user has not logged himself."""
        if not self._enabled or self._finished or self._pid != os.getpid():
            return
        try:
            self._merge(step, {k: v if isinstance(v, Mapping) or k == "skipped" else host_value(v)
                               for k, v in values.items()}, False)
        except Exception as exc:
            self._client_error(exc)

    def hold(self, step: int) -> None:
        """Keep `step` open: instrumentation will add to it (read back from the device later)."""
        with self._lock:
            self._held.add(step)

    def release(self, step: int) -> None:
        with self._lock:
            self._held.discard(step)
            opened = self._judge_locked([])
        if opened:
            self._incidents_seen(opened)

    def add_flush_hook(self, hook: Callable[[], None]) -> None:
        self._flush_hooks.append(hook)

    def instrumentation_error(self, exc: Exception) -> None:
        self._client_error(exc, "instrumentation_error")

    # -- lifecycle ---------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Seal every open step and wait (at most `timeout`, default `flush_timeout`) for delivery."""
        if not self._enabled or self._pid != os.getpid():
            return True
        self._run_flush_hooks()
        self._seal(all_open=True)
        return self._worker.flush(self.options.flush_timeout if timeout is None else timeout)

    def finish(self, status: str = "finished", timeout: float | None = None) -> DeliveryReport:
        """End the run: deliver what is left within `timeout` (default `flush_timeout`), leave the rest in the
        spool, set the run's status, and report every step not delivered. Safe to call twice."""
        if self._report is not None:
            return self._report
        if not self._enabled or self._pid != os.getpid():
            self._finished = True
            return DeliveryReport(self.run_id)
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        self._run_flush_hooks()
        self._finished = True
        self._seal(all_open=True)
        deadline = time.monotonic() + (self.options.flush_timeout if timeout is None else timeout)
        self._worker.update_run({"status": status})
        delivered = self._worker.flush(max(0.0, deadline - time.monotonic()))
        if delivered:
            self._worker.stop()
        else:
            self._worker.abandon()
        report = self._build_report()
        if report.spooled == 0 and delivered:
            self._worker.spool.remove_if_empty()
        self._report = report
        _live_runs.discard(self)
        if report.lost:
            logger.warning("gradwatch: %s", report)
            if self.options.strict:
                raise GradwatchError(str(report))
        elif report.spooled:
            logger.warning("gradwatch: %s", report)
        return report

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("stopped")
        else:
            self.finish("failed")

    @property
    def lost(self) -> dict[str, int]:
        with self.stats.lock:
            return dict(self.stats.lost)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def enabled(self) -> bool:
        return self._enabled and self._pid == os.getpid()

    # -- step records ------------------------------------------------------------------------------------
    def _merge(self, step: int, values: Mapping[str, Any], by_user: bool) -> None:
        """Fold values into the step's record (`by_user`: they win over measured ones), seal the records
        two or more steps behind it, and judge what is complete."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        sealed: list[StepRecord] = []
        with self._lock:
            record = self._open.get(step)
            if record is None:
                if step <= self._sealed_max:
                    self.stats.count_lost("late_step", 1)
                    if self.options.strict:
                        raise GradwatchError(f"step {step} was already sent; a step cannot be split")
                    return
                record = self._open[step] = StepRecord(step)
                if len(self._open) > 2 or (len(self._open) == 2 and min(self._open) < step - 1):
                    for k in [k for k in self._open if k < step - 1 and k not in self._held]:
                        sealed.append(self._open.pop(k))
                    if sealed:
                        self._sealed_max = max(self._sealed_max, max(r.step for r in sealed))
            record.merge(values, by_user)
            record.logged = record.logged or by_user
            opened = self._judge_locked(sealed)
        for r in sealed:
            self._worker.submit(r)
        if opened:
            self._incidents_seen(opened)

    def _seal(self, all_open: bool = False, older_than: float | None = None) -> None:
        with self._lock:
            if all_open:
                keys = list(self._open)
            else:
                now = time.monotonic()
                keys = [k for k, r in self._open.items()
                        if k not in self._held and older_than is not None and now - r.touched > older_than]
            sealed = [self._open.pop(k) for k in sorted(keys)]
            if sealed:
                self._sealed_max = max(self._sealed_max, max(r.step for r in sealed))
            opened = self._judge_locked(sealed)
        for r in sealed:
            self._worker.submit(r)
        if opened:
            self._incidents_seen(opened)

    def _judge_locked(self, sealed: list[StepRecord]) -> list[dict[str, Any]]:
        """Caller holds `_lock`. Run the local detectors, in step order, over every record being sealed now
        that they have not seen, then over each open record that is complete: logged by the user, not held
        by instrumentation, and with no value still on its way from a device. Incidents opened are returned
        (to be reported outside the lock)."""
        detector = self._detector
        if detector is None:
            return []
        ready = [r for r in sorted(sealed, key=lambda r: r.step) if not r.judged]
        for step in sorted(self._open):
            record = self._open[step]
            if record.judged:
                continue
            if not record.logged or step in self._held or not record.on_host():
                break
            ready.append(record)
        opened: list[dict[str, Any]] = []
        for record in ready:
            try:
                opened += detector.judge(record)
            except Exception:  # a bug in detection must cost neither the step nor the training loop
                logger.exception("gradwatch: local detection failed on step %s", record.step)
        return opened

    def _seal_stale(self) -> None:
        if self._open and not self._finished:
            self._seal(older_than=self.options.seal_after)

    def _run_flush_hooks(self) -> None:
        for hook in list(self._flush_hooks):
            try:
                hook()
            except Exception as exc:
                self._client_error(exc)

    # -- incidents ---------------------------------------------------------------------------------------
    def _incidents_seen(self, incidents: list[dict[str, Any]]) -> None:
        """Incidents from the service (sender thread) or the local detectors (training thread): each one not
        seen before goes to on_alert, and critical ones to the loop (acted on in `log()`)."""
        for incident in incidents:
            if not isinstance(incident, dict):
                continue
            key = _incident_key(incident)
            with self._seen_lock:
                if key in self._seen_incidents:
                    continue
                self._seen_incidents.add(key)
            if self.options.on_alert is not None:
                try:
                    self.options.on_alert(incident)
                except Exception:
                    logger.exception("gradwatch: on_alert raised (ignored)")
            if incident.get("severity") == "critical":
                self._criticals.append(incident)

    def _act_on_critical(self) -> None:
        incident = self._criticals.popleft()
        mode = self.options.on_critical
        if mode == "raise":
            raise CriticalIncident(incident)
        if mode == "stop":
            self.should_stop = True
        elif not self._warned_critical:
            self._warned_critical = True
            warnings.warn(f"gradwatch: {CriticalIncident(incident)} in run {self.run_id}", RuntimeWarning,
                          stacklevel=3)

    # -- errors and reports ------------------------------------------------------------------------------
    def _client_error(self, exc: Exception, reason: str = "invalid_value") -> None:
        """A failure in the client's own work: raised in strict mode, else counted and logged (three times)."""
        if self.options.strict:
            raise GradwatchError(str(exc)) from exc
        self.stats.count_lost(reason, 1)
        self._client_errors += 1
        if self._client_errors <= 3:
            logger.error("gradwatch: %s: %r (the step goes on without it)", reason.replace("_", " "), exc)

    def _build_report(self) -> DeliveryReport:
        with self.stats.lock:
            lost = {k: v for k, v in self.stats.lost.items() if v}
            spooled = self.stats.spooled
            return DeliveryReport(
                run_id=self.run_id, steps=self.stats.sealed, delivered=self.stats.delivered,
                spooled=spooled, lost=lost,
                spool_dir=str(self._worker.spool.directory) if spooled else None, refused=self.stats.refused,
            )

    def __repr__(self) -> str:
        return f"<gradwatch.Run {self.run_id} project={self.project!r} name={self.name!r}>"


class _LocalDetector:
    """The service's detectors (`gradwatch.detect`), run in the client on each step as soon as it is complete,
    so that alerts work while the service is down and a job that asked to stop stops at the step that raised
    the critical. Imported on first use: `import gradwatch` stays cheap."""

    def __init__(self) -> None:
        from . import detect, incidents

        self._detect = detect
        self._track = incidents.track_incidents
        self._config = detect.DetectorConfig()
        self._state = detect.new_state()
        self._incidents = incidents.new_incident_state()

    def judge(self, record: StepRecord) -> list[dict[str, Any]]:
        """The incidents opened (or escalated) at this step, shaped like the service's. A value still on
        its way from a device is waited for here; `Run._judge_locked` avoids that for open steps."""
        record.judged = True
        record.materialize()
        self._state, events = self._detect.advance(self._state, record.as_detector_input(), self._config)
        self._incidents, opened, _resolved = self._track(self._incidents, events, record.step, self._config,
                                                        self._detect.held_signatures(self._state))
        return [{**incident, "source": "local"} for incident in opened]


def _incident_key(incident: dict[str, Any]) -> Any:
    """The same incident from the service and from the local detectors has the same key; an escalation
    (warning to critical) is a new one. The opening step is the service's `opened_step` and the local
    detectors' `opened_at` (the service's `opened_at` is a time, not a step)."""
    signature = incident.get("signature")
    if signature is None:
        return ("id", incident.get("id"))
    opened = next((v for v in (incident.get("opened_step"), incident.get("opened_at"), incident.get("step"))
                   if type(v) is int), None)
    if opened is None:
        return ("id", incident.get("id"), signature, incident.get("severity"))
    return (signature, opened, incident.get("severity"))




def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(5).hex()


def _distributed_rank() -> int | None:
    """This process's rank under torch.distributed (or torchrun's RANK), without importing torch."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:
        pass
    rank = os.environ.get("RANK")
    if rank is not None and rank.isdigit() and os.environ.get("WORLD_SIZE", "1") != "1":
        return int(rank)
    return None


def _register_atexit() -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_finish_live_runs)
            _atexit_registered = True


def _finish_live_runs() -> None:
    """At interpreter exit: finish every run the script left open, with a bounded flush each."""
    crashed = getattr(sys, "last_value", None) is not None
    for run in list(_live_runs):
        try:
            run.finish("crashed" if crashed else "finished")
        except Exception:
            logger.exception("gradwatch: finishing run %s at exit failed", run.run_id)
