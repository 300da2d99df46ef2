"""Settings come from GRADWATCH_* variables, default to a loopback, embedded set-up, and refuse nonsense."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gradwatch_service.settings import Settings


def test_defaults_are_loopback_and_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GRADWATCH_DATABASE_URL", "GRADWATCH_HOST", "GRADWATCH_DETECTION", "GRADWATCH_DETECTOR"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.host == "127.0.0.1"
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("gradwatch.db")
    assert s.detector_config() is not None


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_DATABASE_URL", "postgresql+psycopg://u@db/gw")
    monkeypatch.setenv("GRADWATCH_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("GRADWATCH_DETECTOR", '{"resolve_after_steps": 7}')
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.database_url == "postgresql+psycopg://u@db/gw"
    assert s.max_body_bytes == 2048
    assert s.detector_config().resolve_after_steps == 7
    monkeypatch.setenv("GRADWATCH_DETECTION", "false")
    assert Settings(_env_file=None).detector_config() is None  # type: ignore[call-arg]


@pytest.mark.parametrize(("name", "value"), [
    ("GRADWATCH_DETECTOR", '{"no_such_threshold": 1}'),
    ("GRADWATCH_MAX_BODY_BYTES", "12"),
    ("GRADWATCH_SQLITE_SYNCHRONOUS", "SOMETIMES"),
])
def test_nonsense_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]
