"""Alerting: webhook subscriptions, the outbox and its delivery worker, signatures and bodies, and the
Prometheus side (the service's metrics, run state)."""
