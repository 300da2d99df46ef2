"""What the Lightning and Hugging Face callbacks share: the run they open, what they do on a critical incident,
and the loss of an optimizer step made of several micro-batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from .._options import DENSE_STEPS, CallbackOptions
from .._run import Run, init
from ..wire import RunStatus, jsonable

__all__ = ["CriticalAction", "Instrumented", "WatchSettings"]

logger = logging.getLogger("gradwatch")

CriticalAction = Literal["stop", "checkpoint", "warn"]
"""What a callback does on a critical incident: stop the trainer at that step; save a checkpoint, then stop;
or only warn (once, as `on_critical="warn"` does) and train on."""


class WatchSettings:
    """`watch()`'s sampling settings, as a callback takes them."""

    def __init__(self, weight_every: int | None = None, update_every: int | None = None,
                 dense_steps: int = DENSE_STEPS) -> None:
        self.weight_every = weight_every
        self.update_every = update_every
        self.dense_steps = dense_steps


class Instrumented:
    """The run of one training, opened by the callback (or handed to it), and the state it keeps per step."""

    def __init__(self, run: Run | None, on_critical: CriticalAction, project: str | None, name: str | None,
                 config: Mapping[str, Any] | None, run_id: str | None, meta: Mapping[str, Any] | None,
                 options: CallbackOptions) -> None:
        if on_critical not in ("stop", "checkpoint", "warn"):
            raise ValueError(f"on_critical must be 'stop', 'checkpoint' or 'warn', not {on_critical!r}")
        if run is not None and (project or name or config or run_id or meta or options):
            raise TypeError("give the callback either a run or the options to open one, not both")
        self.given_run = run
        self.run: Run | None = run
        self.on_critical = on_critical
        self.project, self.name, self.config, self.run_id, self.meta = project, name, config, run_id, meta
        self.options = options
        self.critical: dict[str, Any] | None = None
        """The critical incident the trainer was stopped for (None: it was not)."""
        self.stopped_at: int | None = None
        """The optimizer step after which the callback stopped the trainer."""
        self.checkpoint_path: str | None = None
        """Where the checkpoint saved on the critical incident went (on_critical="checkpoint")."""
        self._user_on_alert = options.get("on_alert")
        self._loss: Any = None
        self._micro_batches = 0

    def open(self, config: Mapping[str, Any], meta: Mapping[str, Any]) -> Run:
        """The run: the one handed over, or a new one with the trainer's hyper-parameters as its config (the
        user's `config` wins where both name a key). Local detection is on, so the trainer stops at the step
        that raised the critical, not a batch later."""
        if self.run is not None:
            return self.run
        options: CallbackOptions = {**self.options, "on_alert": self._alert}
        options.setdefault("local_detection", True)
        self.run = init(self.project, self.name, {**jsonable(dict(config)), **dict(self.config or {})},
                        run_id=self.run_id, meta={**meta, **dict(self.meta or {})},
                        on_critical="warn" if self.on_critical == "warn" else "stop", **options)
        return self.run

    def _alert(self, incident: dict[str, Any]) -> None:
        if incident.get("severity") == "critical" and self.critical is None:
            self.critical = incident
        if self._user_on_alert is not None:
            self._user_on_alert(incident)

    # -- the loss of an optimizer step ------------------------------------------------------------------
    def add_loss(self, loss: Any, mean: bool = False) -> None:
        """A micro-batch's loss (a tensor, added without reading it back). `mean`: the step's loss is the mean
        of its micro-batches' (each normalized by its own size); else their sum (each already divided by the
        number of micro-batches, or by the step's token count)."""
        self._loss = loss if self._loss is None else self._loss + loss
        self._micro_batches += 1 if mean else 0

    def take_loss(self) -> Any:
        loss, n = self._loss, self._micro_batches
        self._loss, self._micro_batches = None, 0
        return loss / n if loss is not None and n > 1 else loss

    # -- closing the loop ---------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Whether the run asked to stop (a critical incident, with on_critical "stop" or "checkpoint")."""
        return self.run is not None and self.run.should_stop and self.on_critical != "warn"

    def finish(self, status: RunStatus) -> None:
        """End a run the callback opened (a run handed to it is the caller's to finish)."""
        if self.run is not None and self.given_run is None and not self.run.finished:
            try:
                self.run.finish("stopped" if self.stopped_at is not None and status == "finished" else status)
            except Exception:
                logger.exception("gradwatch: finishing run %s failed", self.run.run_id)


def hyper_parameters(*sources: Any) -> dict[str, Any]:
    """The hyper-parameters of a module, a datamodule, a config: anything with `hparams` or `to_dict`, or a
    mapping; later sources win."""
    out: dict[str, Any] = {}
    for source in sources:
        if source is None:
            continue
        values: Any = getattr(source, "hparams", None)
        if values is None and callable(getattr(source, "to_dict", None)):
            values = source.to_dict()
        if values is None and isinstance(source, Mapping):
            values = source
        if isinstance(values, Mapping):
            out.update({str(k): v for k, v in values.items()})
    return out


def first_lr_groups(optimizer: Any) -> dict[str, Any]:
    """The learning rates of every parameter group after the first (watch() records the first as `lr`)."""
    groups = getattr(optimizer, "param_groups", None) or []
    return {f"lr_group{i}": float(g["lr"]) for i, g in enumerate(groups) if i and "lr" in g}


def call_quietly(what: str, fn: Callable[[], object]) -> bool:
    """A callback's own work must not take the training down with it: False (and logged) where it raised."""
    try:
        fn()
    except Exception:
        logger.exception("gradwatch: %s failed (training goes on)", what)
        return False
    return True
