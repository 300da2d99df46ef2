"""Service settings, read once from the environment (prefix GRADWATCH_) or a .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gradwatch.detect import DetectorConfig

from .alerting.webhook_targets import TargetPolicy

DEFAULT_DATA_DIR = Path(".gradwatch")


class Settings(BaseSettings):
    """Every knob of the service. Defaults give a zero-set-up, loopback-only, embedded-SQLite service."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_DATA_DIR / 'gradwatch.db'}",
        description="SQLAlchemy URL: sqlite:///path/to/file.db (default) or postgresql+psycopg://user@host/db",
    )
    host: str = Field(default="127.0.0.1", description="bind address; loopback by default")
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes of `gradwatch serve` (--workers)")
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024,
        description="cap on a request body, applied both to the bytes received and after gzip decompression",
    )
    max_batch_steps: int = Field(default=20_000, ge=1, description="most steps one POST may carry")
    # Input limits (limits.py): going over one is a 422 that names it. Where a database column holds the value,
    # the setting may not exceed the column's width.
    max_run_layers: int = Field(default=10_000, ge=1, description="most layers a run may have, all appends counted")
    max_layer_name_chars: int = Field(
        default=256, ge=1, le=256, description="longest layer name (characters; an incident's column holds 256)")
    max_run_name_chars: int = Field(
        default=256, ge=1, le=256, description="longest run name (characters; the runs.name column holds 256)")
    max_config_bytes: int = Field(
        default=65_536, ge=2, description="largest run config, and run meta, each as compact JSON (bytes)")
    max_step_scalars: int = Field(default=100, ge=0, description="most extra scalars (`scalars`) one step may carry")
    max_scalar_name_chars: int = Field(default=128, ge=1, description="longest extra scalar name (characters)")
    max_webhook_subscriptions: int = Field(default=100, ge=0, description="most webhook subscriptions in all")
    max_webhook_url_chars: int = Field(default=2048, ge=8, description="longest webhook URL (characters)")
    max_webhook_name_chars: int = Field(
        default=128, ge=1, le=128, description="longest webhook name (characters; the column holds 128)")
    # Output bounds (limits.py): what one answer may hold, so no request makes the service build an unbounded
    # response; going over one is a 422 that names it (and says how to ask for less).
    max_batch_values: int = Field(
        default=500_000, ge=1, description="most values one step batch may carry, every number counted (JSON: "
        "its items, counted before parsing; binary: from its header); over it a 413, like max_batch_steps")
    max_response_values: int = Field(
        default=1_000_000, ge=1, description="most values one /steps or /series answer may read or hold (a raw "
        "read counts every layer of the rows it reads); ask a narrower range, fewer fields or layers, or max_points")
    max_response_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="most bytes of stored JSON (runs' config and meta) one list "
        "answer may carry; ask a smaller limit")
    sqlite_synchronous: str = Field(
        default="FULL", pattern="^(OFF|NORMAL|FULL|EXTRA)$",
        description="SQLite PRAGMA synchronous; FULL makes every acknowledged batch survive power loss",
    )
    ingest_concurrency: int = Field(
        default=1, ge=1, description="batches processed at once per process; scale out with workers or replicas")
    detection: bool = Field(default=True, description="run the explosion detectors on every ingested batch")
    detector: dict[str, Any] = Field(
        default_factory=dict,
        description="DetectorConfig overrides as JSON, e.g. GRADWATCH_DETECTOR='{\"layer_z\": 5}'",
    )
    db_pool_size: int = Field(default=8, ge=1, description="PostgreSQL connection pool size per process")
    db_busy_timeout_s: float = Field(
        default=10.0, gt=0, description="longest a request waits for the database: SQLite's write lock (the "
        "writers' flock and SQLite's busy timeout), a PostgreSQL connection (connect timeout and pool wait); "
        "past it the request is answered 503 with Retry-After")
    db_retry_after_s: int = Field(
        default=2, ge=1, description="the Retry-After (seconds) of a 503 answered while the database is unavailable")
    metrics: bool = Field(
        default=True, description="serve Prometheus metrics: the /metrics route, per-request and ingest counters "
                                  "(off: no /metrics, and requests and batches are not counted)")
    metrics_active_seconds: float = Field(
        default=3600, gt=0, description="/metrics exports the state of runs updated within this many seconds")
    metrics_max_runs: int = Field(
        default=1000, ge=0, description="most runs /metrics exports (most recently updated first); "
                                        "gradwatch_runs_not_exported counts the rest")
    metrics_cache_seconds: float = Field(
        default=1.0, ge=0, description="how long one database read of run state serves /metrics scrapes")
    metrics_dir: Path | None = Field(
        default=None, description="prometheus-client's multiprocess directory, used with `serve --workers N` "
                                  "(N > 1); emptied at start. Unset: a temporary directory")
    external_url: str | None = Field(
        default=None, description="the URL people reach this service at, for links in webhooks; "
        "default http://HOST:PORT")
    webhook_delivery: bool = Field(
        default=True, description="run the webhook delivery worker in this process (off: the outbox only fills)")
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="wall-clock deadline of one webhook POST: connect, send and read together")
    webhook_concurrency: int = Field(
        default=8, ge=1, description="webhook POSTs in flight per process; at most one per subscription")
    webhook_retry_base_s: float = Field(
        default=5.0, gt=0, description="delay before the first retry; doubles each attempt, with jitter")
    webhook_retry_max_delay_s: float = Field(default=3600.0, gt=0, description="longest delay between two attempts")
    webhook_retry_for_s: float = Field(
        default=86400.0, gt=0, description="how long a delivery is retried before it is marked dead")
    webhook_poll_s: float = Field(
        default=1.0, gt=0, description="how often the worker looks for due deliveries when nothing woke it")
    webhook_allowed_targets: str = Field(
        default="", description="comma-separated host names, IP addresses and CIDR networks that webhooks may "
        "reach although they are loopback, private or link-local (webhook_targets.py), e.g. 127.0.0.1,10.0.0.0/8")
    webhook_allow_private_targets: bool = Field(
        default=False, description="broad switch: allow every loopback, private and link-local webhook target "
        "(cloud metadata stays refused); prefer naming targets in webhook_allowed_targets")

    insecure: bool = Field(
        default=False, description="serve every route without a token even on a non-loopback address while no token "
                                   "exists (`serve --insecure`); never needed on loopback")
    auth_cache_seconds: float = Field(
        default=1.0, ge=0, le=1.0, description="how long a process trusts what it read of the tokens table (a "
                                               "token, or whether any exists): a revocation is seen within this")
    metrics_token: SecretStr | None = Field(
        default=None, description="a bearer token of its own for /metrics (Prometheus' credentials); when set, "
                                  "/metrics takes it or an all-projects read token, and nothing else")
    metrics_token_file: Path | None = Field(
        default=None, description="a file holding the metrics token (read once at start; surrounding whitespace "
                                  "dropped), instead of GRADWATCH_METRICS_TOKEN")

    @field_validator("detector")
    @classmethod
    def _known_detector_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            DetectorConfig(**v)
        except TypeError as exc:  # an unknown field: say which ones exist
            known = ", ".join(DetectorConfig.__dataclass_fields__)
            raise ValueError(f"{exc}; DetectorConfig fields are: {known}") from None
        return v

    @field_validator("webhook_allowed_targets")
    @classmethod
    def _parsable_targets(cls, v: str) -> str:
        TargetPolicy.parse(v)
        return v

    def webhook_target_policy(self) -> TargetPolicy:
        """What webhooks may reach beyond public addresses (webhook_targets.py)."""
        return TargetPolicy.parse(self.webhook_allowed_targets, self.webhook_allow_private_targets)

    def detector_config(self) -> DetectorConfig | None:
        """The DetectorConfig ingest uses, or None when detection is off."""
        return DetectorConfig(**self.detector) if self.detection else None

    def scrape_token(self) -> str | None:
        """The metrics token, from GRADWATCH_METRICS_TOKEN or the file GRADWATCH_METRICS_TOKEN_FILE names."""
        if self.metrics_token is not None:
            return self.metrics_token.get_secret_value() or None
        if self.metrics_token_file is not None:
            return self.metrics_token_file.read_text().strip() or None
        return None

    def public_url(self) -> str:
        """Where people reach this service: `external_url`, else the bind address."""
        return (self.external_url or f"http://{self.host}:{self.port}").rstrip("/")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
