"""What a test needs from outside the repository, and what happens when it is missing.

Locally a missing PostgreSQL or a missing ../shared skips the tests that need it, so a newcomer's `make test` is
green on a bare machine. With CI=true it fails the run instead: CI must run every test, never pass by skipping.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "unavailable"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(what: str, problem: str) -> NoReturn:
    """Skip the calling test because `what` is missing, or fail it under CI=true."""
    message = f"{what}: {problem}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: tests that need it must run)")
    pytest.skip(message)
