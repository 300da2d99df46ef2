"""The webhook body: Alertmanager's webhook format (version 4) plus a `gradwatch` object.

Receivers written for Alertmanager (PagerDuty bridges, chat relays, on-call tools) work unchanged: one alert per
incident, labelled like a Prometheus alert. The fingerprint is the incident's, not a hash of its labels, so an
escalation (warning → critical) stays the same alert and `resolved` closes exactly what `firing` opened.
`gradwatch` carries what Alertmanager cannot: the incident with its evidence (non-finite values as the wire
strings "NaN", "Infinity", "-Infinity") and the run's URL.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

__all__ = ["ZERO_TIME", "alert_body", "encode_body", "fingerprint"]

ZERO_TIME = "0001-01-01T00:00:00Z"
"""Alertmanager's `endsAt` for an alert that is still firing."""


def fingerprint(incident_id: str) -> str:
    return hashlib.sha256(incident_id.encode()).hexdigest()[:16]


def _rfc3339(t: str | None) -> str:
    return ZERO_TIME if t is None else t.replace("+00:00", "Z")


def alert_body(event: str, incident: dict[str, Any], receiver: str, external_url: str) -> dict[str, Any]:
    """`incident` is the public Incident (`schemas.Incident`) as JSON, frozen when the event happened."""
    run_id = incident["run_id"]
    run_url = f"{external_url}/v1/runs/{quote(run_id, safe='')}"
    labels = {"alertname": f"gradwatch_{incident['signature']}", "project": incident["project"], "run": run_id,
              "signature": incident["signature"], "severity": incident["severity"]}
    if incident.get("layer"):
        labels["layer"] = incident["layer"]
    annotations = {"summary": f"{incident['signature']} in run {run_id} ({incident['project']})",
                   "description": incident["message"]}
    alert = {"status": event, "labels": labels, "annotations": annotations,
             "startsAt": _rfc3339(incident["opened_at"]),
             "endsAt": _rfc3339(incident["resolved_at"]) if event == "resolved" else ZERO_TIME,
             "generatorURL": f"{run_url}/incidents", "fingerprint": fingerprint(incident["id"])}
    group_labels = {"project": incident["project"], "run": run_id}
    return {
        "version": "4",
        "groupKey": f'{{}}:{{project="{incident["project"]}", run="{run_id}"}}',
        "truncatedAlerts": 0,
        "status": event,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [alert],
        "gradwatch": {"event": event, "incident": incident, "run_url": run_url},
    }


def encode_body(body: dict[str, Any]) -> bytes:
    """Compact JSON; `allow_nan=False` because a bare NaN token is not JSON (values are already wire strings)."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
