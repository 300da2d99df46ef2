"""The seam between instrumentation and a run.

`watch()` (and the Lightning and Hugging Face callbacks to come) record what they measure through this
protocol, never through a run's internals, so any of them works with any object that provides it: a `Run`,
or a stand-in in a test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["StepSink"]


class StepSink(Protocol):
    """What instrumentation needs of a run."""

    @property
    def enabled(self) -> bool:
        """False where nothing is recorded (ranks other than 0, forked children): install no hooks."""

    @property
    def finished(self) -> bool:
        """True once the run has ended; hooks still installed then do nothing."""

    def log_measured(self, step: int, values: Mapping[str, Any]) -> None:
        """Record measured values for a step, filling only what the user has not logged himself. Keys are
        `log()`'s (`grad_norm`, `lr`, `update_norm`, `skipped`) and `log_layers()`'s (`grad_norms`,
        `weight_norms`, `update_norms`: layer name -> value)."""

    def hold(self, step: int) -> None:
        """Keep `step` open (not sent, not judged) until `release`: its values are still on their way."""

    def release(self, step: int) -> None:
        """The values of a held step are all recorded."""

    def add_flush_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook` before `flush()` and `finish()` seal the open steps, to record what is still pending."""

    def instrumentation_error(self, exc: Exception) -> None:
        """A failure in the instrumentation: raised in strict mode, else counted (`instrumentation_error`)."""
