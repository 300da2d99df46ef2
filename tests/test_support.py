"""The test support's own promise: what a test needs from outside the repository is never skipped under CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import traces
from .support.traces import require_labelled_traces


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_labelled_traces_fail_under_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.setattr(traces, "SHARED", tmp_path / "no-shared-here")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="labelled traces"):
        require_labelled_traces()


def test_present_labelled_traces_are_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "traces" / "dev").mkdir(parents=True)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "score.py").touch()
    monkeypatch.setattr(traces, "SHARED", tmp_path)
    monkeypatch.setenv("CI", "true")
    assert require_labelled_traces() == (tmp_path / "traces" / "dev", tmp_path / "tools" / "score.py")
