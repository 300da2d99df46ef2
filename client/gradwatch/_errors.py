"""Exceptions the client raises into user code, and only these.

A client error never reaches the training loop unless the user asked for it (`strict=True`, or
`on_critical="raise"`), so the set of exceptions users may have to catch is small and lives here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CriticalIncident", "GradwatchError"]


class GradwatchError(Exception):
    """A client-side failure surfaced because the run is in strict mode."""


class CriticalIncident(GradwatchError):
    """Raised at the next `log()` after the service (or the local detector) opened a critical incident.

    Only with `init(..., on_critical="raise")`; `incident` is the incident as the service reported it.
    """

    def __init__(self, incident: dict[str, Any]) -> None:
        self.incident = incident
        signature = incident.get("signature", "incident")
        layer = incident.get("layer")
        where = f" in {layer}" if layer else ""
        step = incident.get("step", incident.get("opened_step"))
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"critical {signature}{where}{at}")
