"""Every option `gradwatch.init` takes, typed and documented in one place.

Defaults are chosen so that the client is invisible in the step time and loses nothing across an outage
of a few hours: small bounded memory, a bounded disk spool, a short flush at exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from ._transport import Transport

__all__ = ["DEFAULT_URL", "DENSE_STEPS", "CallbackOptions", "InitOptions", "OnCritical", "Options", "default_spool_dir"]

DEFAULT_URL = "http://127.0.0.1:8000"
DENSE_STEPS = 20
"""watch() measures weight and update norms on every one of its first DENSE_STEPS steps (then it samples them):
a run that blows up in its first updates shows it only there."""

OnCritical = Literal["warn", "raise", "stop"]


def default_spool_dir() -> Path:
    """`GRADWATCH_SPOOL_DIR`, else `$XDG_CACHE_HOME/gradwatch/spool`, else `~/.cache/gradwatch/spool`."""
    explicit = os.environ.get("GRADWATCH_SPOOL_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "gradwatch" / "spool"


@dataclass
class Options:
    """How a run talks to the service. Every field is also a keyword of `gradwatch.init`."""

    url: str = field(default_factory=lambda: os.environ.get("GRADWATCH_URL") or DEFAULT_URL)
    """Base URL of the service; `GRADWATCH_URL` when not given."""
    token: str | None = field(default_factory=lambda: os.environ.get("GRADWATCH_TOKEN") or None)
    """Bearer token with the ingest scope; `GRADWATCH_TOKEN` when not given. Never written to disk."""
    spool_dir: Path = field(default_factory=default_spool_dir)
    """Where steps wait while the service is unreachable (one sub-directory per run)."""
    spool_max_bytes: int = 512 * 1024 * 1024
    """Upper bound on the whole spool directory; steps beyond it are counted as lost (`spool_full`)."""
    max_queue: int = 10_000
    """Sealed steps held in memory; beyond it steps go straight to the spool."""
    batch_size: int = 500
    """Most steps in one request."""
    batch_age: float = 1.0
    """Most seconds a sealed step waits for its batch to fill."""
    seal_after: float = 10.0
    """A step nobody has touched for this long is sealed even though no later step was logged."""
    timeout: float = 5.0
    """Socket timeout of one HTTP request, in seconds."""
    flush_timeout: float = 2.0
    """How long `finish()` (and interpreter exit) waits for delivery before leaving the rest in the spool."""
    min_backoff: float = 0.5
    """First retry delay after a failure; it doubles per failure, with jitter."""
    max_backoff: float = 30.0
    """Longest retry delay (a `Retry-After` header may ask for longer, up to five minutes)."""
    compress: bool = True
    """gzip JSON request bodies (binary step batches are sent as they are)."""
    wire: Literal["binary", "json"] = "binary"
    """How step batches travel: binary float64 columns (cheaper to build in the training process, and for the
    service to store), or JSON. A service that refuses binary (415) gets JSON automatically."""
    strict: bool = False
    """Raise client errors (bad values, lost steps at finish) into the caller instead of logging them."""
    all_ranks: bool = False
    """Under torch.distributed every rank sends, each as its own run; by default only rank 0 does."""
    on_alert: Callable[[dict[str, Any]], object] | None = None
    """Called with each newly seen incident (from the sender thread for the service's, from the training
    thread for the local detectors'); its exceptions are logged, not raised."""
    on_critical: OnCritical = "warn"
    """What `log()` does once a critical incident opened: warn once, raise, or set `should_stop`."""
    local_detection: bool | None = None
    """Run the detectors in the client, in the training thread, on each step as soon as its values are in:
    alerts work with the service down, and `on_critical` acts in the `log()` of the step that raised the
    critical instead of when the service's answer comes back (up to `batch_age` later). None (the default):
    on exactly when `on_critical` is "stop" or "raise", where acting a batch late means training on into NaN."""
    transport: Transport | None = None
    """How batches reach the service: None for HTTP to `url`; `gradwatch.testing.MemoryTransport()` to test a
    training script's instrumentation with no server (anything with the methods of `gradwatch.Transport`)."""


class CallbackOptions(TypedDict, total=False):
    """The options of the framework callbacks (`gradwatch.integrations`): init's less `on_critical`, which a
    callback sets itself (its own `on_critical` says what it does to the trainer)."""

    url: str
    token: str | None
    spool_dir: Path | str
    spool_max_bytes: int
    max_queue: int
    batch_size: int
    batch_age: float
    seal_after: float
    timeout: float
    flush_timeout: float
    min_backoff: float
    max_backoff: float
    compress: bool
    wire: Literal["binary", "json"]
    strict: bool
    all_ranks: bool
    on_alert: Callable[[dict[str, Any]], object] | None
    local_detection: bool | None
    transport: Transport | None


class InitOptions(CallbackOptions, total=False):
    """The options of `gradwatch.init`, as keywords: the fields of `Options` (documented there), so that a
    misspelled or mistyped option is an error in a type checker as well as a TypeError at the call. A test
    holds the two to the same names and types."""

    on_critical: OnCritical
